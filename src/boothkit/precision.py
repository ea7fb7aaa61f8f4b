"""Which precision fits this machine: `--mixed-precision auto`, and a warning where a choice is emulated.

GPUs: bf16 where the GPU does it natively (Ampere and newer), else fp16. CPUs: bf16 only where the CPU has
bf16 instructions (AVX-512 BF16 or AMX) *and* a short matmul probe finds bf16 faster than fp32 with this
torch; elsewhere bf16 is emulated (measured 26x slower than fp32 on an AVX2-only EPYC), so auto means fp32.
The probe's result is cached per machine in BOOTHKIT_HOME/precision.json.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from .files import atomic_write_bytes

log = logging.getLogger("boothkit")

AUTO = "auto"
# What auto resolves to, whatever the hardware (the test suite pins it, so numbers do not depend on the CPU).
ENV_OVERRIDE = "BOOTHKIT_AUTO_PRECISION"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FASTER = 1.2  # bf16 must beat fp32 by this factor in the probe to be chosen
_warned: set[str] = set()


def cpu_description() -> tuple[str, frozenset[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; flags are empty where it is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", frozenset()
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", "unknown CPU"), frozenset(fields.get("flags", "").split())


def native_cpu_bf16() -> bool:
    return any(f in cpu_description()[1] for f in NATIVE_BF16_FLAGS)


def _matmul_seconds(dtype: torch.dtype, n: int = 512, reps: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):  # warm-up: kernel selection, caches
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a 512x512 matmul on this CPU (> 1: bf16 is faster), cached per machine."""
    from .models import boothkit_home

    model, flags = cpu_description()
    key = f"{model}|{'native' if native_cpu_bf16() else 'emulated'}|torch {torch.__version__}|" \
          f"threads {torch.get_num_threads()}"
    path = boothkit_home() / "precision.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        with torch.no_grad():
            cache[key] = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
        try:
            atomic_write_bytes(path, json.dumps(cache, indent=2).encode())
        except OSError:  # a read-only home only costs the probe again next time
            pass
    return float(cache[key])


def resolve(choice: str, device: str) -> str:
    """The precision a run uses: `choice` itself unless it is 'auto' (then what this hardware does best)."""
    if choice != AUTO:
        warn_if_emulated(choice, device)
        return choice
    pinned = os.environ.get(ENV_OVERRIDE)
    if pinned in ("no", "bf16", "fp16"):
        return pinned
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if native_cpu_bf16() and cpu_bf16_speedup() >= FASTER:
        return "bf16"
    return "no"


def warn_if_emulated(choice: str, device: str) -> None:
    """Warn once when bf16 is asked for on a CPU that emulates it."""
    if choice != "bf16" or device != "cpu" or native_cpu_bf16() or choice in _warned:
        return
    _warned.add(choice)
    slower = 1.0 / cpu_bf16_speedup()
    log.warning("--mixed-precision bf16: this CPU (%s) has no bf16 instructions; a matmul probe ran %.0fx slower "
                "in bf16 than in fp32. --mixed-precision auto (or no) uses fp32 here.", cpu_description()[0], slower)
