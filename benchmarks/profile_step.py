"""Where the time of one LoRA-style training step of a UNet goes, by operator (torch.profiler, self CPU time).

The UNet's weights are frozen in the chosen precision and the gradient flows back through every activation to the
input, as in LoRA training (the LoRA matrices themselves cost little). Batch 2 = 1 subject + 1 class picture.
Usage: python benchmarks/profile_step.py [--model sd15-shape] [--resolution 256] [--precision bf16] [--top 14]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15-shape")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from boothkit.models.loading import load_pipeline
    from boothkit.evaluate.speed import machine

    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    pipe = load_pipeline(a.model)
    unet = pipe.unet.to(dtype).requires_grad_(False)
    side = a.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, side, side, generator=g).to(dtype).requires_grad_(True)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([10, 500])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            out = unet(x, t, encoder_hidden_states=text).sample
        out.float().square().mean().backward()

    step()  # warm-up: kernel selection
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"machine: {machine()}\nmodel {a.model}, {a.resolution} px, batch 2, {a.precision}: {seconds:.3f} s per "
          f"forward + backward (unprofiled)\n")
    print("| operator | self time (s) | share | calls |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:a.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.3f} | {100 * e.self_cpu_time_total / total:.1f}% | "
              f"{e.count} |")


if __name__ == "__main__":
    main()
