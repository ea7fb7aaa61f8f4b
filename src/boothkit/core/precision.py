"""Which precision fits this machine: `--mixed-precision auto`, and a warning where a choice is emulated.

GPUs: bf16 where the GPU does it natively (Ampere and newer), else fp16. CPUs: bf16 only where the CPU has
bf16 instructions (AVX-512 BF16 or AMX) *and* a measured probe finds bf16 faster; elsewhere bf16 is emulated
(measured 26x slower than fp32 on an AVX2-only EPYC), so auto means fp32. Training probes the model itself (one
forward and backward of its UNet, fp32 against bf16 autocast): on an AVX-512 BF16 EPYC a 512x512 matmul runs 2x
faster in bf16, yet mini's 6.7 M-parameter UNet trains 2.6x slower under autocast (the casts cost more than the
small layers gain), so a matmul alone cannot decide. Generation (weights in bf16, no casts) uses the matmul
probe. Both probes take medians of several runs; the timings are cached per machine, torch version and model
(its architecture's digest) in BOOTHKIT_HOME/precision.json.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import ConfigError
from .files import atomic_write_bytes, boothkit_home

log = logging.getLogger("boothkit")

AUTO = "auto"
# What auto resolves to, whatever the hardware (the test suite pins it, so numbers do not depend on the CPU).
ENV_OVERRIDE = "BOOTHKIT_AUTO_PRECISION"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 must be this many times as fast in the probe to be chosen. Three probes of mini-flow's step on one machine
# gave 1.18x, 1.30x and 1.31x (BENCHMARKS.md): at a margin inside that spread, chance would fix the precision (and
# so the pictures) for good; fp32 is the exact choice when the gain is small.
FASTER = 1.5
STEP_REPEATS = 3  # a training-step probe's timings are medians of this many steps per precision
_warned: set[str] = set()
# The one map from precision names to torch dtypes: "no" is the --mixed-precision value for full precision
# (accelerate's name), "fp32" the same as export's --save-precision and the speed tables write it.
DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_name(dtype: torch.dtype) -> str:
    """The --mixed-precision value of a torch dtype ("no" for float32)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def default_device() -> str:
    """Where work runs unless told otherwise: the CUDA GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name: str) -> torch.device:
    """The torch device --device names ('auto': default_device()); one this machine lacks is refused here, not deep
    inside a model."""
    if name == "auto":
        return torch.device(default_device())
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


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
    return statistics.median(times)


@dataclass(frozen=True)
class Timings:
    """What a probe measured: the median seconds of the same work in fp32 and in bf16."""
    fp32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:  # > 1: bf16 is faster
        return self.fp32_s / self.bf16_s

    def __str__(self) -> str:
        return f"fp32 {self.fp32_s * 1e3:.1f} ms, bf16 {self.bf16_s * 1e3:.1f} ms: {self.speedup:.2f}x"


def _cache() -> tuple[Path, dict]:
    path = boothkit_home() / "precision.json"
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, {}


def _key(what: str) -> str:
    return f"{cpu_description()[0]}|{'native' if native_cpu_bf16() else 'emulated'}|{what}|" \
           f"torch {torch.__version__}|threads {torch.get_num_threads()}"


def _entry(cache: dict, key: str) -> Optional[Timings]:
    """The cached timings under `key`; None for none (or an entry of an older format: it is probed again)."""
    found = cache.get(key)
    if isinstance(found, dict) and {"fp32_s", "bf16_s"} <= found.keys():
        return Timings(float(found["fp32_s"]), float(found["bf16_s"]))
    return None


def _cached(what: str, measure: Callable[[], Timings]) -> Timings:
    """Timings measured once per (CPU, what, torch, threads) and kept in BOOTHKIT_HOME/precision.json; `what`
    names the model and its architecture's digest, so a new torch or a changed model is probed again."""
    path, cache = _cache()
    key = _key(what)
    found = _entry(cache, key)
    if found is None:
        found = measure()
        cache[key] = {"fp32_s": found.fp32_s, "bf16_s": found.bf16_s, "speedup": round(found.speedup, 4)}
        try:
            atomic_write_bytes(path, json.dumps(cache, indent=2).encode())
        except OSError:  # a read-only home only costs the probe again next time
            pass
    return found


def cpu_bf16_timings() -> Timings:
    """A 512x512 matmul in fp32 and in bf16 on this CPU (medians of 5)."""
    with torch.no_grad():
        return _cached("matmul 512", lambda: Timings(_matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)))


def step_timings(model, forward, repeats: int = STEP_REPEATS) -> Timings:
    """One forward and backward of `model` as `forward(module)` runs it (on random inputs that need gradients, as
    LoRA layers' inputs do), in fp32 and under bf16 autocast: medians of `repeats`, the two kinds taken in turn so
    that a busy moment of the machine falls on both. The weights stay as they are."""
    device = next(model.parameters()).device
    # as training holds it: frozen weights in bf16 under autocast (with fp32 weights, autocast would re-cast every
    # weight at every op, and the probe would measure that instead); a copy, so `model` keeps its own precision
    fast = copy.deepcopy(model).to(torch.bfloat16)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(fast if bf16 else model)
        out.float().square().mean().backward()
        return time.perf_counter() - start

    with torch.random.fork_rng():
        step(False), step(True)  # warm-up: kernel selection, caches
        times = [(step(False), step(True)) for _ in range(repeats)]
    return Timings(statistics.median(t for t, _ in times), statistics.median(t for _, t in times))


def resolve(choice: str, device: str, probe: Optional[Callable[[], Timings]] = None, model: str = "") -> str:
    """The precision a run uses: `choice` itself unless it is 'auto', then what this hardware does best.

    probe: on a CPU with bf16 instructions, times this model's training step in both precisions (cached under
    `model`, which should name the model and its architecture); without one, the matmul probe decides (generation).
    bf16 is chosen only when it is at least FASTER times as fast; the decision is logged with both timings."""
    if choice != AUTO:
        warn_if_emulated(choice, device)
        if probe is not None:
            warn_if_slow(choice, device, model)
        return choice
    pinned = os.environ.get(ENV_OVERRIDE)
    if pinned in ("no", "bf16", "fp16"):
        return pinned
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not native_cpu_bf16():
        return "no"
    what = f"{model}'s training step" if probe is not None else "a 512x512 matmul"
    timings = _cached(f"train {model}", probe) if probe is not None else cpu_bf16_timings()
    chosen = "bf16" if timings.speedup >= FASTER else "no"
    log.info("--mixed-precision auto: %s (%s on %s, medians: %s; bf16 needs %.1fx)",
             "bf16" if chosen == "bf16" else "fp32", what, cpu_description()[0], timings, FASTER)
    return chosen


def warn_if_emulated(choice: str, device: str) -> None:
    """Warn once when bf16 is asked for on a CPU that emulates it."""
    if choice != "bf16" or device != "cpu" or native_cpu_bf16() or choice in _warned:
        return
    _warned.add(choice)
    slower = 1.0 / cpu_bf16_timings().speedup
    log.warning("--mixed-precision bf16: this CPU (%s) has no bf16 instructions; a matmul probe ran %.0fx slower "
                "in bf16 than in fp32. --mixed-precision auto (or no) uses fp32 here.", cpu_description()[0], slower)


def warn_if_slow(choice: str, device: str, model: str) -> None:
    """Warn when fp32 is asked for on a CPU where this model's probe found bf16 at least twice as fast (only
    where that probe already ran: an explicit choice never waits for one)."""
    if choice != "no" or device != "cpu" or not native_cpu_bf16():
        return
    found = _entry(_cache()[1], _key(f"train {model}"))
    if found is not None and found.speedup >= 2.0:
        log.warning("--mixed-precision no: on this CPU (%s) %s trains %.1fx faster in bf16 (measured); "
                    "--mixed-precision auto uses it", cpu_description()[0], model, found.speedup)
