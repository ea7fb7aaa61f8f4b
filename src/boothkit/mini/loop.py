"""The shared machinery of `boothkit pretrain`'s stages (boothkit.mini.stages, boothkit.mini.flow_stages): the
scenes a step sees, the training loop (AdamW, warm-up + cosine lr, EMA, resumable checkpoints, log.csv), loading
a finished stage, memoised caption tokens and the loss-curve figure."""
from __future__ import annotations

import csv
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..core.errors import ConfigError
from ..core.progress import progress_bar
from ..core.report import figure_png
from ..models.mini import tokenizer
from ..train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_states
from .emoji import load_emoji, world
from .pretrain import PretrainConfig
from .scenes import SceneGenerator

# ------------------------------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=2)
def scene_generator(cfg: PretrainConfig):
    """The stage's scenes; cached, so a stage that draws from it twice loads the emoji once."""
    if cfg.emoji_file:
        if not Path(cfg.emoji_file).is_file():
            raise ConfigError(f"pretrain.emoji_file: {cfg.emoji_file} does not exist")
        return SceneGenerator(load_emoji(Path(cfg.emoji_file)), seed=cfg.seed)
    return SceneGenerator(world(), seed=cfg.seed)


def pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 pictures -> float tensor in [-1, 1], NCHW."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def batches(gen, batch: int, start_step: int) -> Iterator[tuple[int, list]]:
    """(step, scenes) from `start_step` on; step s always gets the same scenes, so a resume sees the same data."""
    step = start_step
    while True:
        yield step, gen.batch(step * batch, batch)
        step += 1


# ------------------------------------------------------------------------------------------------- loop

def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


class Log:
    """Appends rows to OUT/log.csv; a resumed run keeps the rows it had."""

    def __init__(self, path: Path, fields: Sequence[str], start_step: int):
        self.path, self.fields = path, list(fields)
        rows = []
        if path.is_file() and start_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)
        # a resumed run's clock goes on from the time logged at its checkpoint, so curves show the stage's time
        self.seconds = float(rows[-1].get("seconds") or 0) if rows else 0.0

    def write(self, **row: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def train_loop(cfg: PretrainConfig, out: Path, modules: dict[str, torch.nn.Module], step_fn: Callable,
               *, ema: Sequence[str] = (), warmup: int = 100,
               after_checkpoint: Optional[Callable[[int, dict], None]] = None) -> None:
    """The shared loop: AdamW over `modules`, warm-up + cosine lr, EMA copies of the modules named in `ema`,
    resumable checkpoints, log.csv, progress bar. `step_fn(step, scenes) -> loss`; `after_checkpoint(step, emas)`
    runs after each checkpoint is written (sample grids)."""
    from diffusers.training_utils import EMAModel


    steps, batch, lr = cfg.recipe()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(steps, min(warmup, steps)))
    emas = {n: EMAModel(modules[n].parameters(), decay=0.9995, use_ema_warmup=True, power=2 / 3) for n in ema}
    start = 0
    if found := list_checkpoints(out):
        ck = load_checkpoint(found[-1][1])
        for name, m in modules.items():
            m.load_state_dict(_prefixed(ck["weights"], name))
        for name, e in emas.items():
            e.load_state_dict(_ema_state(ck, found[-1][1], name))
        optim.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["lr_scheduler"])
        set_rng_states(ck["rng"])
        start = ck["step"]
    gen = scene_generator(cfg)
    log = Log(out / "log.csv", ["step", "loss", "lr", "seconds"], start)
    t0 = time.time() - log.seconds
    with progress_bar(f"pretrain {cfg.stage}", steps, completed=start, show_loss=True) as advance:
        for step, scenes in batches(gen, batch, start):
            if step >= steps:
                break
            loss = step_fn(step, scenes)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            for name, e in emas.items():
                e.step(modules[name].parameters())
            log.write(step=step + 1, loss=f"{loss.item():.5f}", lr=f"{sched.get_last_lr()[0]:.3e}",
                      seconds=f"{time.time() - t0:.1f}")
            advance(loss=loss.item())
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                weights = _weights(modules)
                # the EMAs go inside the checkpoint, written and renamed with it: a kill never leaves one without
                save_checkpoint(out, step + 1, weights, optim, sched, keep=2,
                                states={f"ema-{name}": e.state_dict() for name, e in emas.items()})
                if after_checkpoint is not None:
                    after_checkpoint(step + 1, emas)


def _weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every module's state under its name; a tensor shared by two keys (T5's tied input embeddings) is written
    twice, as safetensors cannot hold shared memory, and loads back into the one parameter."""
    weights, seen = {}, set()
    for n, m in modules.items():
        for k, v in m.state_dict().items():
            weights[f"{n}.{k}"] = v.clone() if v.data_ptr() in seen else v
            seen.add(v.data_ptr())
    return weights


def _ema_state(ck: dict, path: Path, name: str) -> dict:
    """An EMA's state from a checkpoint: inside it, or (checkpoints written before that) in ema-NAME.pt beside it."""
    if f"ema-{name}" in ck["states"]:
        return ck["states"][f"ema-{name}"]
    return torch.load(path / f"ema-{name}.pt", weights_only=True)


def _prefixed(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}


def load_stage(out: Path, modules: dict[str, torch.nn.Module]) -> int:
    """Load a finished stage's weights into `modules` (EMA weights where the stage kept them); returns its step."""
    from diffusers.training_utils import EMAModel


    found = list_checkpoints(out)
    if not found:
        raise ConfigError(f"pretrain: {out} has no checkpoint; run that stage first")
    step, path = found[-1]
    ck = load_checkpoint(path)
    for name, m in modules.items():
        m.load_state_dict(_prefixed(ck["weights"], name))
        if f"ema-{name}" in ck["states"] or (path / f"ema-{name}.pt").is_file():
            e = EMAModel(m.parameters())
            e.load_state_dict(_ema_state(ck, path, name))
            e.copy_to(m.parameters())
    return step


class Captions:
    """Tokenised captions, memoised: the slow tokenizer sees each distinct caption once. `tok`: mini's CLIP
    tokenizer unless given (mini-flow's T5 one)."""

    def __init__(self, tok=None):
        self.tok, self.cache = tok or tokenizer(), {}

    def __call__(self, captions: Sequence[str], max_length: int = 77) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tok(missing, padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


def plot_curves(work: Path, names: Sequence[str] = ("vae", "unet", "clip", "dino")) -> bytes:
    """PNG: the loss curve of every stage of `names` that has a log (raw and smoothed over 50 steps)."""
    from matplotlib.figure import Figure


    stages = [s for s in names if (work / s / "log.csv").is_file()]
    fig = Figure(figsize=(3.2 * max(1, len(stages)), 2.8))
    for k, stage in enumerate(stages):
        with (work / stage / "log.csv").open() as f:
            rows = list(csv.DictReader(f))
        steps, loss = [int(r["step"]) for r in rows], np.array([float(r["loss"]) for r in rows])
        smooth = np.convolve(loss, np.ones(50) / 50, mode="valid") if len(loss) >= 50 else loss
        ax = fig.add_subplot(1, len(stages), k + 1)
        ax.plot(steps, loss, lw=0.4, alpha=0.4)
        ax.plot(steps[len(steps) - len(smooth):], smooth, lw=1.2)
        ax.set_title(f"{stage}: final {smooth[-1]:.4f}, {float(rows[-1]['seconds']) / 60:.0f} min", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)

