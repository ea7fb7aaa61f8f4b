"""Training memory of LoRA on FLUX.1-dev and SD3.5-medium/large (estimate), and the estimate checked on this CPU.

The full-size tables come from `boothkit.models.memory.estimate` on the published configs (meta device: nothing is
downloaded or allocated). The check builds a small random FluxTransformer2DModel (2 double + 2 single blocks,
8 heads of 16), injects boothkit's default LoRA, and measures one training step (forward, backward, AdamW step) in
its own process: every torch CPU allocation and free during the step is recorded by torch.profiler
(profile_memory=True) and replayed in time order; the measured peak is the tensors alive before the step plus the
highest running sum. That number is set beside the estimate for the same config.
Usage: python benchmarks/memory_flow.py [--only-check]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

SMALL = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=8,
             joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
TEXT_TOKENS = 64


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def small_model(precision: str):
    """The small Flux with the default LoRA (fp32 LoRA weights; base weights in the precision), and its Facts."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from boothkit.models import memory, published

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**SMALL)
    counts = {"transformer": published.stored_count(model)}
    facts_base = FluxTransformer2DModel(**SMALL)  # the Linear shapes before injection
    model.requires_grad_(False)
    if precision == "bf16":
        model.to(torch.bfloat16)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=list(published.FLUX_LORA_TARGETS),
                                       exclude_modules=published.FLUX_LORA_EXCLUDE), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    facts = memory.facts_of(facts_base, model, counts=counts, text_tokens=TEXT_TOKENS, name="small Flux")
    return model, facts


def measure(precision: str, resolution: int, checkpointing: bool) -> dict:
    """One LoRA training step (batch 2: a subject and a class picture), its peak bytes from the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    model, facts = small_model(precision)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side = resolution // 16
    image, batch = side * side, 2
    inputs = dict(hidden_states=torch.randn(batch, image, 64), encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 64),
                  pooled_projections=torch.randn(batch, 32), timestep=torch.full((batch,), 0.5),
                  img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.ones(batch))
    target = torch.randn(batch, image, 64)
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                  for t in [*model.state_dict().values(), *inputs.values(), target]}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = model(**inputs).sample
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated, as between a run's steps
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return {"measured": before + peak, "facts": facts.__dict__}


def check_rows() -> list[str]:
    from boothkit.models import memory

    rows = ["| small Flux (2+2 blocks, d 128), batch 1 + prior, rank 16 | px | estimate MiB | measured MiB | "
            "measured / estimate | CPU |", "|---|---:|---:|---:|---:|---|"]
    for precision, res, ckpt in [("fp32", 512, False), ("fp32", 512, True), ("bf16", 512, False),
                                 ("bf16", 512, True), ("fp32", 1024, False)]:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps([precision, res, ckpt])],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        got = json.loads(out)
        est = memory.estimate(memory.Facts(**got["facts"]), resolution=res, batch_size=1, rank=16,
                              base_dtype=precision, gradient_checkpointing=ckpt)
        rows.append(f"| {precision}{' autocast' if precision == 'bf16' else ''}, "
                    f"{'checkpointing' if ckpt else 'no checkpointing'} | {res} | {est.train_step / 2**20:.1f} | "
                    f"{got['measured'] / 2**20:.1f} | {got['measured'] / est.train_step:.2f} | {cpu_name()} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--only-check", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    import torch

    from boothkit.models import memory, published

    print(f"machine: {cpu_name()}, torch {torch.__version__}, {platform.machine()}; estimates need no device\n")
    if not args.only_check:
        for hub_id in (published.FLUX_DEV, published.SD35_MEDIUM, published.SD35_LARGE):
            facts = memory.hub_facts(hub_id)
            print(summary(memory, facts), "\n")
        print(memory.estimate(memory.hub_facts(published.FLUX_DEV), resolution=1024, quantize="nf4",
                              gradient_checkpointing=True).table(), "\n")
    print("\n".join(check_rows()))


def summary(memory, facts) -> str:
    """One model's peaks (GiB) at 512 and 1024 px, bf16/int8/nf4 base, with and without checkpointing."""
    enc = memory.estimate(facts, resolution=512).encoding / memory.GIB
    lines = [f"**{facts.name}** — LoRA rank 16 ({facts.lora_in_out * 16 / 1e6:.1f} M parameters), batch 1 + prior, "
             f"AdamW, cached text and latents; peak GiB = max(training step, encoding before it: text encoders "
             f"bf16 + VAE = {enc:.1f}); in brackets the transformer weights' GiB", "",
             "| base | 512 px | 512 px, ckpt | 1024 px | 1024 px, ckpt |", "|---|---:|---:|---:|---:|"]
    for base, quant in (("bf16", None), ("bf16", "int8"), ("bf16", "nf4")):
        cells = []
        for res in (512, 1024):
            for ckpt in (False, True):
                e = memory.estimate(facts, resolution=res, quantize=quant, gradient_checkpointing=ckpt)
                cells.append(f"{e.peak / memory.GIB:.1f}")
        w = memory.weight_bytes(facts, base, quant) / memory.GIB
        lines.append(f"| {quant or base} ({w:.1f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
