"""The optimizers `--optimizer` names, built from their own packages: AdamW (torch; 8-bit from bitsandbytes on a
GPU), Prodigy (prodigyopt: it estimates the step size itself), schedule-free AdamW (schedulefree: no decaying
schedule, it averages the iterates) and Adafactor (transformers: factored second moments, the least state)."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from ..core.config import RunConfig
from ..core.errors import ConfigError

log = logging.getLogger("boothkit")


def make_optimizer(cfg: RunConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer over the parameter groups (each with its own lr), and its name as run (auto resolved)."""
    t = cfg.train
    kind = t.optimizer
    if kind in ("auto", "adamw8bit"):
        try:
            import bitsandbytes as bnb  # noqa: F401
            have_bnb = torch.cuda.is_available()
        except ImportError:
            have_bnb = False
        if kind == "adamw8bit" and not have_bnb:
            raise ConfigError("train.optimizer adamw8bit needs bitsandbytes and a CUDA GPU")
        kind = "adamw8bit" if have_bnb else "adamw"
    betas, decay = (t.adam_beta1, t.adam_beta2), t.weight_decay
    if kind == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy finds the step size; a group's lr multiplies it. The learning rates keep their ratio (the text
        # encoder's to the denoiser's) with the denoiser's at 1.0, the value Prodigy is made for.
        log.info("--optimizer prodigy: it estimates the learning rate itself (--learning-rate %g read as 1.0, the "
                 "other rates in proportion)", t.learning_rate)
        groups = [{**g, "lr": g["lr"] / t.learning_rate} for g in groups]
        return Prodigy(groups, lr=1.0, betas=betas, weight_decay=decay, eps=t.adam_epsilon,
                       use_bias_correction=True, safeguard_warmup=t.lr_warmup_steps > 0), kind
    if kind == "adamw-schedulefree":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(groups, betas=betas, eps=t.adam_epsilon, weight_decay=decay,
                                warmup_steps=t.lr_warmup_steps)
        opt.train()  # the gradient is taken at the interpolated point; averaged() switches to the average
        return opt, kind
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=decay), kind
    cls, extra = torch.optim.AdamW, {}
    if kind == "adamw8bit":
        import bitsandbytes as bnb
        cls = bnb.optim.AdamW8bit
    elif all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]):
        # one kernel for every tensor instead of torch's default foreach loop: 4-5.5x faster per optimizer step on
        # this project's CPU (benchmarks/optimizer.py); it matters for full fine-tunes (LoRA's step is tiny)
        extra["fused"] = True
    return cls(groups, betas=betas, eps=t.adam_epsilon, weight_decay=decay, **extra), kind


@contextlib.contextmanager
def averaged(optimizer) -> Iterator[None]:
    """The weights to look at and to save: schedule-free AdamW trains at an interpolated point and holds the average
    it converges in its state; inside this block the parameters are the average (its eval mode), after it they are
    the training point again. Other optimizers: the parameters as they are. Checkpoints are written outside it, so
    a resumed run continues from exactly the training point."""
    switch = getattr(getattr(optimizer, "optimizer", optimizer), "eval", None)  # accelerate's wrapper or bare
    if switch is None:
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
