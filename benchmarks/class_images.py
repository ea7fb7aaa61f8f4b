"""Class-image samplers: time per image and closeness to a converged reference, per sampler and step count.

Every sampler solves the same probability-flow ODE from the same seeded noise; the reference is DDIM at 200 steps.
Closeness is LPIPS (real pretrained AlexNet LPIPS) between a sampler's picture and the reference picture of the
same seed: lower means fewer steps lost less. Usage:
    python benchmarks/class_images.py [--model mini] [--prompt "an emoji of a girl"] [--seeds 16]
Prints a markdown table; needs `boothkit lpips import` once.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

CANDIDATES = [("ddim", 30), ("pndm", 30), ("ddim", 25), ("ddim", 20), ("pndm", 20), ("euler", 25), ("euler", 20),
              ("dpm++2m", 25), ("dpm++2m", 20), ("dpm++2m-karras", 25), ("dpm++2m-karras", 20), ("dpm++2m-karras", 15),
              ("dpm++2m-karras", 10), ("unipc", 20)]


def main() -> None:
    from boothkit.generate.generation import generate_images, make_scheduler
    from boothkit.evaluate.metrics import load_lpips, lpips_pairs
    from boothkit.models.loading import load_pipeline
    from boothkit.core.precision import cpu_description

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--prompt", default="an emoji of a girl")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    pipe = load_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    lpips = load_lpips("alex", torch.device("cpu"))

    def run(name: str, steps: int):
        pipe.scheduler = make_scheduler(name, base_config)
        start = time.perf_counter()
        images = generate_images(pipe, a.prompt, num_images=a.seeds, seed=0, steps=steps, guidance=7.5,
                                 batch_size=a.batch)
        return images, (time.perf_counter() - start) / a.seeds

    reference, _ = run("ddim", 200)
    print(f"machine: {cpu_description()[0]}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}; model {a.model}; prompt {a.prompt!r}; {a.seeds} seeds, batch {a.batch}, fp32\n")
    print("| sampler | steps | s / image | LPIPS to DDIM-200 ↓ |\n|---|---|---|---|")
    for name, steps in CANDIDATES:
        images, per_image = run(name, steps)
        n = len(images)
        d = lpips_pairs(lpips, images + reference, [(i, n + i) for i in range(n)], 64)
        print(f"| {name} | {steps} | {per_image:.3f} | {float(d.mean()):.4f} |", flush=True)


if __name__ == "__main__":
    main()
