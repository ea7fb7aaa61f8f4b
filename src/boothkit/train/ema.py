"""An exponential moving average of the trained weights (--ema-decay), kept by diffusers' EMAModel.

EMAModel tracks any list of parameters, so it serves LoRA adapters and a full fine-tune alike. Its decay ramps up
as min(decay, (1 + n) / (10 + n)) after n updates: a few hundred DreamBooth steps with a fixed 0.9999 would barely
move the average off the initial weights (LoRA's zero update).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import BoothkitError


def make_ema(params: list[torch.nn.Parameter], decay: float, on_cpu: bool):
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=decay)
    if on_cpu:
        ema.to("cpu")
    return ema


def update(ema, params: list[torch.nn.Parameter], on_cpu: bool) -> None:
    """One EMA step after an optimizer step. An EMA held on the CPU visits the weights' device for it, as diffusers'
    own --offload_ema does: the weights' memory is free for the forward and backward passes in between."""
    device = params[0].device
    visiting = on_cpu and device.type != "cpu"
    if visiting:
        ema.to(device)
    ema.step(params)
    if visiting:
        ema.to("cpu")


@contextlib.contextmanager
def swapped_in(ema, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The EMA weights in place of the trained ones inside the block (validation samples); no-op without EMA."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def load(ema, state: dict | None, params: list[torch.nn.Parameter], on_cpu: bool, path: Path) -> None:
    """Restore the EMA of a checkpoint (`state`: EMAModel.state_dict()); a missing or mismatched one is refused."""
    if state is None:
        raise BoothkitError(f"--resume: checkpoint {path} holds no EMA weights (it was written without "
                            f"--ema-decay); resume without --ema-decay, or pass --overwrite to start again")
    shadow = state.get("shadow_params")
    if not isinstance(shadow, list) or [tuple(s.shape) for s in shadow] != [tuple(p.shape) for p in params]:
        raise BoothkitError(f"--resume: checkpoint {path} does not match this config (its EMA weights have other "
                            f"shapes)")
    ema.load_state_dict(state)
    ema.to("cpu" if on_cpu else params[0].device)
