"""Training step time and peak memory of the tiny model on this machine, per configuration.

Each configuration runs in its own process twice (N1 and N2 steps); the step time is the difference divided
by N2 - N1, so model loading and latent caching are not counted. Peak memory is the process's max RSS.
Usage: python benchmarks/train_step.py [--steps 10,40] [--only NAME]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "src" / "boothkit" / "assets" / "demo_subject"

CONFIGS = {
    "LoRA UNet, fp32": {},
    "LoRA UNet + text encoder, fp32": {"train_text_encoder": True},
    "LoRA UNet + text encoder, bf16": {"train_text_encoder": True, "mixed_precision": "bf16"},
    "LoRA UNet, no latent cache": {"cache_latents": False},
    "LoRA UNet, gradient checkpointing": {"gradient_checkpointing": True},
    "full fine-tune UNet, fp32": {"full": True, "learning_rate": 5e-6},
    "LoRA UNet, no prior": {"prior": False},
}


def child(overrides: dict, steps: int, work: Path) -> None:
    from boothkit.core import config as C
    from boothkit.train.loop import run_training

    values = {"model": "tiny", "instance_dir": str(DEMO), "class_noun": "dog", "output_dir": str(work / f"out-{steps}"),
              "class_dir": str(work / "class"), "num_class_images": 8, "class_steps": 4, "max_steps": steps,
              "overwrite": True, **overrides}
    t0 = time.perf_counter()
    run_training(C.resolve(C.TRAIN_SECTIONS, {}, values), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(name: str, overrides: dict, n1: int, n2: int, work: Path) -> dict:
    runs = {}
    for steps in (n1, n2):
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides), "--steps", str(steps),
                               "--work", str(work)], capture_output=True, text=True, check=True)
        runs[steps] = json.loads(proc.stdout.strip().splitlines()[-1])
    per_step = (runs[n2]["seconds"] - runs[n1]["seconds"]) / (n2 - n1)
    return {"config": name, "ms_per_step": 1000 * per_step, "max_rss_mib": runs[n2]["max_rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="10,40")
    ap.add_argument("--only", default="")
    ap.add_argument("--child")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child), int(args.steps), Path(args.work))
        return
    import torch

    n1, n2 = map(int, args.steps.split(","))
    print(f"tiny model, 64 px, batch 1 (+1 class image with prior), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print("| configuration | ms / step | peak RSS (MiB) |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CONFIGS.items():
            if args.only and args.only not in name:
                continue
            r = measure(name, overrides, n1, n2, Path(tmp))
            print(f"| {r['config']} | {r['ms_per_step']:.1f} | {r['max_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
