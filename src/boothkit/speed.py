"""`boothkit bench speed`: what a training step, a class image and a whole subject cost on this machine.

Each training configuration runs in its own process (so peak memory is its own): `--warmup` steps, then `--steps`
timed ones, the time of a step read between optimizer steps (a torch optimizer hook, nothing in the loop changes).
FLOPs per step come from torch's flop counter on the UNet's forward and backward at the step's batch; the floor is
those FLOPs at the matmul peak measured in the same run.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import opt
from .errors import ConfigError

CONFIGS: dict[str, dict[str, Any]] = {
    "LoRA UNet, prior, fp32": {"mixed_precision": "no"},
    "LoRA UNet, prior, bf16": {"mixed_precision": "bf16"},
    "LoRA UNet + text encoder, prior, fp32": {"mixed_precision": "no", "train_text_encoder": True},
    "LoRA UNet, prior, fp32, gradient checkpointing": {"mixed_precision": "no", "gradient_checkpointing": True},
    "LoRA UNet, no prior, fp32": {"mixed_precision": "no", "prior": False},
    "LoRA UNet, prior without class images, fp32": {"mixed_precision": "no", "prior_target": "frozen",
                                                     "prior_images": "subject"},
}


@dataclass(frozen=True)
class SpeedConfig:
    model: str = opt("sd15-shape", "Model to measure: 'sd15-shape' (SD 1.5's architecture, random weights), 'tiny', "
                                   "or any model boothkit loads.")
    resolution: int = opt(256, "Training and sampling resolution in pixels.", min=64)
    steps: int = opt(3, "Timed training steps per configuration.", min=1)
    warmup: int = opt(1, "Untimed training steps first (kernel selection, caches).", min=1)
    only: tuple[str, ...] = opt((), "Run only configurations whose name contains one of these, e.g. 'fp32'.")
    class_images: int = opt(2, "Class images timed per sampler setting.", min=1)
    out: str = opt("", "Output folder (speed.json, speed.md).", required=True)


SPEED_SECTIONS: dict[str, type] = {"speed": SpeedConfig}


def machine() -> str:
    import torch

    from .precision import cpu_description, native_cpu_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_description()[0]} ({'AVX-512 BF16/AMX' if native_cpu_bf16() else 'no bf16 instructions'}), "
            f"{torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, {platform.machine()}")


def matmul_gflops(dtype_name: str, n: int = 2048) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def unet_gflops(model: str, resolution: int, batch: int, checkpointing: bool) -> float:
    """GFLOPs of one UNet forward and backward (gradients to the activations, as LoRA needs) at `batch`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models import load_pipeline

    unet = load_pipeline(model).unet.requires_grad_(False)
    side = resolution // 8
    x = torch.randn(batch, unet.config.in_channels, side, side, requires_grad=True)
    cond = torch.randn(batch, 77, unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.full((batch,), 500), cond).sample.square().mean().backward()
    total = counter.get_total_flops()
    if checkpointing:  # the forward runs twice
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            unet(x, torch.full((batch,), 500), cond)
        total += fwd.get_total_flops()
    return total / 1e9


def _child(spec: dict) -> None:
    """One configuration in its own process: train and time the steps between optimizer steps, or count the
    FLOPs of its step; reports JSON on the last line. The parent never loads the model: a child's peak memory
    would otherwise include the parent's (Linux keeps ru_maxrss across fork and exec)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from . import config as C
    from .train import run_training

    if spec.get("flops"):
        print(json.dumps({"gflops": unet_gflops(**spec["flops"])}))
        return

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    run_training(C.resolve(C.TRAIN_SECTIONS, {}, spec["train"]), progress=False)
    steps = [b - a for a, b in zip(stamps[spec["warmup"] - 1:], stamps[spec["warmup"]:])]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_seconds": steps, "peak_mib": peak}))


def _train_values(s: SpeedConfig, overrides: dict, work: Path) -> dict:
    from .subjects import demo_subject_dir

    return {"model": s.model, "instance_dir": str(demo_subject_dir()), "token": "[ktn]", "class_noun": "girl",
            "resolution": s.resolution, "class_dir": str(work / "class"), "num_class_images": 2, "class_steps": 2,
            "output_dir": str(work / "run"), "overwrite": True, "max_steps": s.warmup + s.steps, **overrides}


def _in_child(spec: dict, name: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "boothkit.speed", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"bench speed: configuration {name!r} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_config(s: SpeedConfig, name: str, overrides: dict, work: Path) -> dict:
    got = _in_child({"train": _train_values(s, overrides, work), "warmup": s.warmup}, name)
    flops = _in_child({"flops": {"model": s.model, "resolution": s.resolution,
                                 "batch": 1 if overrides.get("prior") is False else 2,
                                 "checkpointing": bool(overrides.get("gradient_checkpointing"))}}, name)
    return {"config": name, "seconds_per_step": statistics.median(got["step_seconds"]), "peak_mib": got["peak_mib"],
            "gflops_per_step": flops["gflops"], "mixed_precision": overrides.get("mixed_precision")}


def class_image_rates(s: SpeedConfig) -> list[dict]:
    """Seconds per class image: the previous default (the model's sampler, 30 steps) and the new one."""
    from .generate import generate_images, make_scheduler
    from .models import load_pipeline

    pipe = load_pipeline(s.model)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    rows = []
    for label, name, steps in ((f"model's own ({type(own).__name__}), 30 steps", None, 30),
                               ("dpm++2m-karras, 20 steps (default)", "dpm++2m-karras", 20)):
        pipe.scheduler = make_scheduler(name, own.config) if name else own
        start = time.perf_counter()
        generate_images(pipe, "a photo of a girl", num_images=s.class_images, seed=0, steps=steps, guidance=7.5,
                        width=s.resolution, height=s.resolution, batch_size=s.class_images)
        rows.append({"sampler": label, "seconds_per_image": (time.perf_counter() - start) / s.class_images})
    return rows


def run_speed(cfg) -> Path:
    """`boothkit bench speed`: prints and writes the tables."""
    from .files import atomic_write_bytes
    from .precision import native_cpu_bf16

    s = cfg.speed
    out = Path(s.out)
    chosen = {n: o for n, o in CONFIGS.items() if not s.only or any(w in n for w in s.only)}
    if not chosen:
        raise ConfigError(f"--only {','.join(s.only)}: matches none of: {'; '.join(CONFIGS)}")
    import torch

    skip_bf16 = not torch.cuda.is_available() and not native_cpu_bf16()  # emulated: ~26x slower, see precision.py
    peaks = {"fp32": matmul_gflops("fp32")}
    if not skip_bf16:
        peaks["bf16"] = matmul_gflops("bf16")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in chosen.items():
            if skip_bf16 and overrides.get("mixed_precision") == "bf16":
                continue
            r = measure_config(s, name, overrides, Path(tmp))
            peak = peaks["bf16" if overrides.get("mixed_precision") == "bf16" else "fp32"]
            r["floor_seconds"] = r["gflops_per_step"] / peak
            r["fraction_of_floor"] = r["floor_seconds"] / r["seconds_per_step"]
            rows.append(r)
            print(f"{name}: {r['seconds_per_step']:.2f} s/step, {r['peak_mib']:.0f} MiB, "
                  f"{100 * r['fraction_of_floor']:.0f}% of the matmul floor", flush=True)
    classes = class_image_rates(s)
    result = {"machine": machine(), "settings": {k: getattr(s, k) for k in ("model", "resolution", "steps", "warmup")},
              "matmul_gflops": peaks, "training": rows, "class_images": classes,
              "time_to_subject": time_to_subject(rows, classes)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "speed.json", json.dumps(result, indent=2).encode())
    text = markdown(result)
    atomic_write_bytes(out / "speed.md", text.encode())
    print(text)
    return out


def time_to_subject(rows: list[dict], classes: list[dict], steps: int = 800, images: int = 100) -> list[dict]:
    """Defaults a user gets: `images` class images + `steps` steps; and the prior without class images."""
    by = {r["config"]: r["seconds_per_step"] for r in rows}
    out = []
    prior = by.get("LoRA UNet, prior, fp32")
    if prior:
        for c in classes:
            out.append({"what": f"{images} class images ({c['sampler']}) + {steps} steps",
                        "seconds": images * c["seconds_per_image"] + steps * prior})
    free = by.get("LoRA UNet, prior without class images, fp32")
    if free:
        out.append({"what": f"prior without class images + {steps} steps", "seconds": steps * free})
    return out


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"machine: {r['machine']}",
             f"model {s['model']}, {s['resolution']} px, batch 1 subject picture (+1 class picture with a prior), "
             f"median of {s['steps']} steps after {s['warmup']}; matmul peak "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["matmul_gflops"].items()), "",
             "| configuration | s / step | peak memory (MiB) | GFLOP / step (UNet) | floor (s) | of floor |",
             "|---|---|---|---|---|---|"]
    for t in r["training"]:
        lines.append(f"| {t['config']} | {t['seconds_per_step']:.2f} | {t['peak_mib']:.0f} | {t['gflops_per_step']:.0f} "
                     f"| {t['floor_seconds']:.2f} | {100 * t['fraction_of_floor']:.0f}% |")
    lines += ["", "| class-image sampler | s / image |", "|---|---|"]
    lines += [f"| {c['sampler']} | {c['seconds_per_image']:.2f} |" for c in r["class_images"]]
    lines += ["", "| time to subject | minutes |", "|---|---|"]
    lines += [f"| {t['what']} | {t['seconds'] / 60:.0f} |" for t in r["time_to_subject"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one configuration in its own process (measure_config)
    _child(json.loads(sys.argv[1]))
