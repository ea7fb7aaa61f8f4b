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

from ..core import config as C
from ..core.config import opt
from ..core.errors import BoothkitError, ConfigError
from ..core.files import atomic_write_bytes
from ..mini.subjects import demo_subject_dir

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

CPU_CONFIGS: dict[str, dict[str, Any]] = {
    "LoRA UNet, prior, fp32": {"mixed_precision": "no"},
    "LoRA UNet, prior, bf16": {"mixed_precision": "bf16"},
    "LoRA UNet, prior, fp32, channels_last": {"mixed_precision": "no", "channels_last": True},
    "LoRA UNet, prior, fp32, compiled": {"mixed_precision": "no", "compile": True},
    "LoRA UNet, prior, bf16, compiled": {"mixed_precision": "bf16", "compile": True},
    "LoRA UNet, prior, bf16, channels_last": {"mixed_precision": "bf16", "channels_last": True},
    "LoRA UNet + text encoder, prior, fp32": {"mixed_precision": "no", "train_text_encoder": True},
    "LoRA UNet, prior, fp32, gradient checkpointing": {"mixed_precision": "no", "gradient_checkpointing": True},
    "LoRA UNet, no prior, fp32": {"mixed_precision": "no", "prior": False},
    "LoRA UNet, prior without class images, fp32": {"mixed_precision": "no", "prior_target": "frozen",
                                                     "prior_images": "subject"},
}
_BF16 = {"mixed_precision": "bf16"}
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "LoRA UNet, prior, bf16": _BF16,
    "LoRA UNet, prior, fp16": {"mixed_precision": "fp16"},
    "LoRA UNet, prior, fp32": {"mixed_precision": "no"},
    "LoRA UNet, prior, bf16, channels_last": {**_BF16, "channels_last": True},
    "LoRA UNet, prior, bf16, compiled": {**_BF16, "compile": True},
    "LoRA UNet + text encoder, prior, bf16": {**_BF16, "train_text_encoder": True},
    "LoRA UNet, prior, bf16, gradient checkpointing": {**_BF16, "gradient_checkpointing": True},
    "LoRA UNet, no prior, bf16": {**_BF16, "prior": False},
    "LoRA UNet, prior without class images, bf16": {**_BF16, "prior_target": "frozen", "prior_images": "subject"},
    "LoRA UNet, prior, bf16, batch 4": {**_BF16, "batch_size": 4},
    "Full UNet, prior, bf16": {**_BF16, "full": True},
    "Full UNet, prior, bf16, gradient checkpointing": {**_BF16, "full": True, "gradient_checkpointing": True},
}
GPU_BUDGETS_GIB = (8, 12, 16, 24)


def select(every: dict[str, dict], only: tuple[str, ...]) -> dict[str, dict]:
    """The configurations `--only` names: a whole name alone, else every name that contains the word."""
    return {n: o for n, o in every.items() if not only or any(w == n or (w not in every and w in n) for w in only)}


def configs() -> dict[str, dict[str, Any]]:
    import torch

    return GPU_CONFIGS if torch.cuda.is_available() else CPU_CONFIGS


@dataclass(frozen=True)
class SpeedConfig:
    model: str = opt("sd15-shape", "Model to measure: 'sd15-shape' (SD 1.5's architecture, random weights), 'tiny', "
                                   "or any model boothkit loads.")
    resolution: int = opt(256, "Training and sampling resolution in pixels.", min=64)
    steps: int = opt(3, "Timed training steps per configuration.", min=1)
    warmup: int = opt(1, "Untimed training steps first (kernel selection, caches).", min=1)
    only: tuple[str, ...] = opt((), "Run only configurations whose name contains one of these, e.g. 'fp32' (a whole "
                                    "name selects that configuration alone).")
    class_images: int = opt(2, "Class images timed per sampler setting (also the batch size).", min=1)
    end_to_end: int = opt(0, "Also time one whole run as a user starts it (100 class images with the defaults, "
                             "then this many steps, best precision); 0: skip.", min=0)
    out: str = opt("", "Output folder (speed.json, speed.md).", required=True)


SPEED_SECTIONS: dict[str, type] = {"speed": SpeedConfig}


def machine() -> str:
    import torch

    from ..core.precision import cpu_description, native_cpu_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_description()[0]} ({'AVX-512 BF16/AMX' if native_cpu_bf16() else 'no bf16 instructions'}), "
            f"{torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, {platform.machine()}")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_gflops(dtype_name: str) -> float:
    """The machine's matmul peak in this precision: the median of five n x n products (n 8192 on a GPU)."""
    import torch

    from ..core.precision import DTYPES, default_device

    dtype = DTYPES[dtype_name]
    n = 8192 if default_device() == "cuda" else 2048
    a, b = (torch.randn(n, n, device=default_device()).to(dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        _sync()
        start = time.perf_counter()
        a @ b
        _sync()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def unet_gflops(model: str, resolution: int, batch: int, checkpointing: bool, full: bool) -> float:
    """GFLOPs of one denoiser (UNet or transformer) forward and backward at `batch`: gradients to the activations
    (what LoRA needs), and to every weight too for a full fine-tune. Counted on the GPU where there is one (the count
    is the same)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..core.precision import default_device
    from ..models.families import family_of
    from ..models.loading import load_pipeline

    gpu = default_device() == "cuda"
    pipe = load_pipeline(model)
    family = family_of(pipe)
    net = getattr(pipe, family.denoiser).requires_grad_(full).to(default_device(),
                                                               torch.bfloat16 if gpu else torch.float32)
    forward = family.probe_forward(net, resolution, batch, cap=False)
    with FlopCounterMode(display=False) as counter:
        forward(net).float().square().mean().backward()
    total = counter.get_total_flops()
    if checkpointing:  # the forward runs twice
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            forward(net)
        total += fwd.get_total_flops()
    return total / 1e9


def _memory() -> dict:
    """Peak memory of this process: RSS on a CPU; on a GPU the peak allocated by tensors, the peak the caching
    allocator held, and what the device has in use now (the CUDA context included: what must fit the card)."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    free, total = torch.cuda.mem_get_info()
    return {"peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20,
            "reserved_mib": torch.cuda.max_memory_reserved() / 2 ** 20, "device_used_mib": (total - free) / 2 ** 20}


def _child(spec: dict) -> None:
    """One configuration in its own process: train and time the steps between optimizer steps, or count the
    FLOPs of its step; reports JSON on the last line. The parent never loads the model: a child's peak memory
    would otherwise include the parent's (Linux keeps ru_maxrss across fork and exec)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from ..train.loop import run_training

    if spec.get("flops"):
        print(json.dumps({"gflops": unet_gflops(**spec["flops"])}))
        return

    stamps: list[float] = []

    def stamp(*_):
        _sync()  # a GPU step has ended when its kernels have, not when they were queued
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(stamp)
    start = time.perf_counter()
    run_training(C.resolve(C.TRAIN_SECTIONS, {}, spec["train"]), progress=False)
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps[spec["warmup"] - 1:], stamps[spec["warmup"]:])]
    if not steps:  # fp16's loss scaler skips the optimizer step while it finds inf gradients
        raise SystemExit(f"only {len(stamps)} optimizer steps ran; raise --steps")
    print(json.dumps({"step_seconds": steps, "wall_seconds": wall, "until_first_step": stamps[0] - start,
                      "training_seconds": stamps[-1] - stamps[0], **_memory()}))


def _train_values(s: SpeedConfig, overrides: dict, work: Path) -> dict:
    return {"model": s.model, "instance_dir": str(demo_subject_dir()), "token": "[ktn]", "class_noun": "girl",
            "resolution": s.resolution, "class_dir": str(work / "class"), "num_class_images": 2, "class_steps": 2,
            "output_dir": str(work / "run"), "overwrite": True, "max_steps": s.warmup + s.steps, **overrides}


def _in_child(spec: dict, name: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "boothkit.evaluate.speed", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"bench speed: configuration {name!r} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_config(s: SpeedConfig, name: str, overrides: dict, work: Path, flops_cache: dict) -> dict:
    got = _in_child({"train": _train_values(s, overrides, work), "warmup": s.warmup}, name)
    batch = overrides.get("batch_size", 1) * (1 if overrides.get("prior") is False else 2)
    key = dict(model=s.model, resolution=s.resolution, batch=batch, full=bool(overrides.get("full")),
               checkpointing=bool(overrides.get("gradient_checkpointing")))
    if json.dumps(key) not in flops_cache:
        flops_cache[json.dumps(key)] = _in_child({"flops": key}, name)["gflops"]
    step = statistics.median(got["step_seconds"])
    return {"config": name, "seconds_per_step": step, "subject_images_per_second": overrides.get("batch_size", 1) / step,
            **{k: v for k, v in got.items() if k.endswith("_mib")}, "until_first_step": got["until_first_step"],
            "gflops_per_step": flops_cache[json.dumps(key)], "mixed_precision": overrides.get("mixed_precision")}


def end_to_end(s: SpeedConfig, precision: str, work: Path) -> dict:
    """One run as a user starts it: the default class images (count, sampler, steps), then `s.end_to_end` steps."""
    values = {k: v for k, v in _train_values(s, {"mixed_precision": precision}, work).items()
              if k not in ("num_class_images", "class_steps")}
    values.update(max_steps=s.end_to_end, class_dir=str(work / "class-end-to-end"))
    got = _in_child({"train": values, "warmup": 1}, "end to end")
    return {"what": f"100 class images + {s.end_to_end} steps, {precision}, measured end to end",
            "seconds": got["wall_seconds"], "until_first_step": got["until_first_step"],
            "training_seconds": got["training_seconds"], **{k: v for k, v in got.items() if k.endswith("_mib")}}


def class_image_rates(s: SpeedConfig) -> list[dict]:
    """Seconds per class image: the previous default (the model's sampler, 30 steps), the new one, and on a GPU
    the new one one image at a time; in the precision training would make them in."""
    import torch

    from ..core.precision import default_device
    from ..generate.generation import generate_images, make_scheduler
    from ..models.families import family_of
    from ..models.loading import load_pipeline

    gpu = default_device() == "cuda"
    pipe = load_pipeline(s.model).to(default_device())
    pipe.set_progress_bar_config(disable=True)
    own, family = pipe.scheduler, family_of(pipe)
    name = family.default_sampler  # the class-image default (--class-scheduler auto); None: the model's own
    default = f"{name or 'the model' + chr(39) + 's own'}, 20 steps (default)"
    settings = [(f"model's own ({type(own).__name__}), 30 steps", None, 30, s.class_images),
                (default, name, 20, s.class_images)]
    if gpu and s.class_images > 1:
        settings.append((default, name, 20, 1))
    rows, guidance = [], family.guidance_of(pipe)
    with torch.autocast(default_device(), dtype=torch.bfloat16, enabled=gpu):
        generate_images(pipe, "a photo of a girl", num_images=1, seed=0, steps=2, guidance=guidance,
                        width=s.resolution, height=s.resolution)  # warm-up: kernel selection
        for label, name, steps, batch in settings:
            pipe.scheduler = make_scheduler(name, own.config, family) if name else own
            start = time.perf_counter()
            generate_images(pipe, "a photo of a girl", num_images=s.class_images, seed=0, steps=steps,
                            guidance=guidance, width=s.resolution, height=s.resolution, batch_size=batch)
            rows.append({"sampler": label, "batch": batch, "precision": "bf16" if gpu else "fp32",
                         "seconds_per_image": (time.perf_counter() - start) / s.class_images})
    return rows


def run_speed(cfg) -> Path:
    """`boothkit bench speed`: prints and writes the tables."""
    from ..core.precision import default_device, native_cpu_bf16

    s = cfg.speed
    out = Path(s.out)
    chosen = select(configs(), s.only)
    if not chosen:
        raise ConfigError(f"--only {','.join(s.only)}: matches none of: {'; '.join(configs())}")
    gpu = default_device() == "cuda"
    skip_bf16 = not gpu and not native_cpu_bf16()  # emulated: ~26x slower, see precision.py
    peaks = {p: matmul_gflops(p) for p in (("fp32", "bf16", "fp16") if gpu else ("fp32",) if skip_bf16 else
                                           ("fp32", "bf16"))}
    rows, flops_cache, failed = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in chosen.items():
            if skip_bf16 and overrides.get("mixed_precision") == "bf16":
                continue
            try:
                r = measure_config(s, name, overrides, Path(tmp), flops_cache)
            except ConfigError as e:  # e.g. out of memory: the table says so and the others still run
                failed.append(f"{name}: {e}")
                print(f"{name}: FAILED: {e}", flush=True)
                continue
            peak = peaks[{"bf16": "bf16", "fp16": "fp16"}.get(overrides.get("mixed_precision"), "fp32")]
            r["floor_seconds"] = r["gflops_per_step"] / peak
            r["fraction_of_floor"] = r["floor_seconds"] / r["seconds_per_step"]
            rows.append(r)
            print(f"{name}: {r['seconds_per_step']:.3f} s/step, {r['peak_mib']:.0f} MiB, "
                  f"{100 * r['fraction_of_floor']:.0f}% of the matmul floor", flush=True)
        classes = class_image_rates(s)
        best = {"fp32": "no"}.get(_best(rows)[1], _best(rows)[1])
        whole = [end_to_end(s, best, Path(tmp))] if s.end_to_end else []
    result = {"machine": machine(), "settings": {k: getattr(s, k) for k in ("model", "resolution", "steps", "warmup")},
              "matmul_gflops": peaks, "training": rows, "class_images": classes,
              "time_to_subject": time_to_subject(rows, classes) + whole,
              "gpu_budgets": gpu_budgets(rows) if gpu else []}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "speed.json", json.dumps(result, indent=2).encode())
    text = markdown(result) + "".join(f"\nFAILED: {f}\n" for f in failed)
    atomic_write_bytes(out / "speed.md", text.encode())
    print(text)
    if failed:
        raise BoothkitError(f"bench speed: {len(failed)} configuration(s) failed (tables in {out}): {failed[0]}")
    return out


def _best(rows: list[dict]) -> tuple[float, str]:
    """(seconds per step, precision) of the fastest 'LoRA UNet, prior, <precision>' row."""
    plain = [(r["seconds_per_step"], "fp32" if r["mixed_precision"] in (None, "no") else r["mixed_precision"]) for r in rows
             if r["config"] in ("LoRA UNet, prior, fp32", "LoRA UNet, prior, bf16", "LoRA UNet, prior, fp16")]
    return min(plain) if plain else (0.0, "fp32")


def time_to_subject(rows: list[dict], classes: list[dict], steps: int = 800, images: int = 100) -> list[dict]:
    """Defaults a user gets: `images` class images + `steps` steps; and the prior without class images."""
    out = []
    step, precision = _best(rows)
    if step:
        for c in classes:
            out.append({"what": f"{images} class images ({c['sampler']}, batch {c['batch']}) + {steps} steps, "
                                f"{precision}", "seconds": images * c["seconds_per_image"] + steps * step})
    free = [r["seconds_per_step"] for r in rows if r["config"].startswith("LoRA UNet, prior without class images")]
    if free:
        out.append({"what": f"prior without class images + {steps} steps", "seconds": steps * free[0]})
    return out


def gpu_budgets(rows: list[dict]) -> list[dict]:
    """For each card size: the fastest LoRA and full configurations whose device memory fits, with 10% to spare."""
    out = []
    for gib in GPU_BUDGETS_GIB:
        fits = [r for r in rows if r["device_used_mib"] * 1.1 <= gib * 1024]
        for kind in ("LoRA", "Full"):
            best = min((r for r in fits if r["config"].startswith(kind)), key=lambda r: r["seconds_per_step"],
                       default=None)
            out.append({"gib": gib, "kind": kind, "config": best["config"] if best else "",
                        "seconds_per_step": best["seconds_per_step"] if best else None,
                        "device_used_mib": best["device_used_mib"] if best else None})
    return out


def markdown(r: dict) -> str:
    s = r["settings"]
    gpu = any("device_used_mib" in t for t in r["training"])
    memory = "| peak allocated / reserved / device used (MiB) " if gpu else "| peak RSS (MiB) "
    lines = [f"machine: {r['machine']}",
             f"model {s['model']}, {s['resolution']} px, batch 1 subject picture (+1 class picture with a prior) "
             f"unless named, median of {s['steps']} steps after {s['warmup']}; matmul peak "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["matmul_gflops"].items()), "",
             f"| configuration | s / step | subject images / s {memory}| GFLOP / step (UNet) | floor (s) | of floor |",
             "|---|---|---|---|---|---|---|"]
    for t in r["training"]:
        mem = (f"{t['peak_mib']:.0f} / {t['reserved_mib']:.0f} / {t['device_used_mib']:.0f}" if gpu
               else f"{t['peak_mib']:.0f}")
        lines.append(f"| {t['config']} | {t['seconds_per_step']:.3f} | {t['subject_images_per_second']:.2f} | {mem} "
                     f"| {t['gflops_per_step']:.0f} | {t['floor_seconds']:.3f} | {100 * t['fraction_of_floor']:.0f}% |")
    lines += ["", "| class-image sampler | batch | precision | s / image |", "|---|---|---|---|"]
    lines += [f"| {c['sampler']} | {c['batch']} | {c['precision']} | {c['seconds_per_image']:.3f} |"
              for c in r["class_images"]]
    lines += ["", "| time to subject | minutes |", "|---|---|"]
    lines += [f"| {t['what']} | {t['seconds'] / 60:.1f} |" for t in r["time_to_subject"]]
    if r.get("gpu_budgets"):
        lines += ["", "| GPU memory | fastest LoRA that fits | s / step | fastest full fine-tune that fits | s / step |",
                  "|---|---|---|---|---|"]
        for lora, full in zip(r["gpu_budgets"][::2], r["gpu_budgets"][1::2]):
            cell = lambda b: (b["config"] or "none", f"{b['seconds_per_step']:.3f}" if b["config"] else "")  # noqa: E731
            lines.append(f"| {lora['gib']} GB | {' | '.join(cell(lora))} | {' | '.join(cell(full))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one configuration in its own process (measure_config)
    _child(json.loads(sys.argv[1]))
