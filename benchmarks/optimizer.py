"""AdamW step time on this machine: torch's default (foreach) against the fused kernel, for what boothkit trains.

The parameter sets have the shapes of SD 1.5's UNet (the `sd15-shape` config, built on the meta device): its LoRA at
rank 16 on the attention projections, and a slice of its weights for a full fine-tune (a whole 860 M-parameter set
needs 14 GB for weights, gradients and AdamW state; the step is linear in the parameter count, so the full UNet's
time is the slice's scaled up). Usage: python benchmarks/optimizer.py [--full-slice 200] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def unet_on_meta():
    from diffusers import UNet2DConditionModel

    from boothkit.models.shapes import sd15_shape_path

    config = UNet2DConditionModel.load_config(sd15_shape_path() / "unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def lora_shapes(unet, rank: int) -> list[tuple[int, ...]]:
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            out += [(rank, module.in_features), (module.out_features, rank)]
    return out


def slice_shapes(unet, millions: float) -> list[tuple[int, ...]]:
    out, total = [], 0
    for p in unet.parameters():
        if total >= millions * 1e6:
            break
        out.append(tuple(p.shape))
        total += p.numel()
    return out


def time_step(shapes: list[tuple[int, ...]], fused: bool, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **({"fused": True} if fused else {"foreach": True}))
    opt.step()  # warm-up: state allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-slice", type=float, default=200, help="millions of UNet parameters for the full row")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from boothkit.evaluate.speed import machine

    unet = unet_on_meta()
    total = sum(p.numel() for p in unet.parameters())
    sets = {"LoRA rank 16, attention (q, k, v, out)": (lora_shapes(unet, 16), 1.0)}
    shapes = slice_shapes(unet, args.full_slice)
    count = sum(torch.Size(s).numel() for s in shapes)
    sets["full UNet (scaled from a slice)"] = (shapes, total / count)
    print(f"machine: {machine()}\n")
    print("| parameters | count | foreach (ms / step) | fused (ms / step) | fused speed-up |\n|---|---|---|---|---|")
    for name, (shapes, scale) in sets.items():
        n = sum(torch.Size(s).numel() for s in shapes) * scale
        foreach, fused = (1000 * scale * time_step(shapes, f, args.repeats) for f in (False, True))
        print(f"| {name} | {n / 1e6:.1f} M | {foreach:.1f} | {fused:.1f} | {foreach / fused:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
