"""Adapter injection through peft: a trainable LoRA, DoRA, LoKr or LoHa in a model, its weights, and running the
model without it (the prior's frozen-base pass)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..core.errors import BoothkitError

ADAPTER = "default"
# --adapter -> the prefix of its peft parameter names; lokr/loha files are not diffusers LoRA files (see apply_lora)
ADAPTER_PREFIX = {"lora": "lora_", "dora": "lora_", "lokr": "lokr_", "loha": "hada_"}
LYCORIS = ("lokr", "loha")


def lora_config(targets, rank: int, alpha: float, dropout: float = 0.0, kind: str = "lora",
                exclude: str | None = None):
    """peft config of adapter `kind` for `targets` (module-name suffixes such as 'to_q' or 'to_out.0'), leaving
    out the modules whose full name matches the regex `exclude` (Flux's final proj_out beside its blocks')."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind in LYCORIS:  # peft's LyCORIS configs: same rank/alpha meaning (scale alpha / r)
        cls = LoKrConfig if kind == "lokr" else LoHaConfig
        return cls(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=list(targets), init_weights=True,
                   exclude_modules=exclude)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      init_lora_weights=True, use_dora=kind == "dora", exclude_modules=exclude)


def add_lora(model: torch.nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0,
             kind: str = "lora", exclude: str | None = None) -> torch.nn.Module:
    """Inject a trainable adapter (its update starts at 0, so the model starts unchanged); freeze everything else."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(targets, rank, alpha, dropout, kind, exclude), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(f".{ADAPTER_PREFIX[kind]}" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise BoothkitError(f"no module of {type(model).__name__} matches the LoRA targets {', '.join(targets)}")
    return model


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """Run `models` as their frozen base (every peft LoRA layer bypassed), then switch the adapters back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT key names (adapter name removed)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)
