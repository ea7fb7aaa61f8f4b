"""The diffusers-format LoRA file boothkit writes and reads.

The file is what diffusers' own training scripts produce: PEFT keys prefixed by component
(``unet.<module>.lora_A.weight`` / ``text_encoder.<module>.lora_B.weight``) with the adapter's LoraConfig
under the ``lora_adapter_metadata`` key, so plain ``pipe.load_lora_weights(folder)`` restores rank and alpha.
boothkit's own facts (base model, token, class noun, ...) sit beside it as ``boothkit.*`` string keys.
LoKr/LoHa files keep peft's names and carry their config under ``boothkit.adapter_config``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..core.errors import BoothkitError, first_line
from ..core.files import atomic_write_bytes
from ..core.safety import as_safetensors, is_pickle
from .inject import LYCORIS

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_PICKLE = "pytorch_lora_weights.bin"  # what older diffusers scripts wrote


def canonical_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name text-encoder LoRA weights as CLIPTextModel's checkpoints do (``text_model.encoder...``).

    transformers 5 dropped the ``text_model.`` level from CLIPTextModel's module tree but still reads it;
    LoRA files everywhere else (diffusers with transformers 4, A1111/kohya converters) expect it.
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def adapter_metadata(targets, rank: int, alpha: float, kind: str = "lora", exclude: str | None = None) -> dict:
    """The LoraConfig fields diffusers reads back from ``lora_adapter_metadata`` (for lokr/loha: the
    LoKrConfig/LoHaConfig fields boothkit reads back from ``boothkit.adapter_config``); `exclude`: the regex of
    modules the targets must not reach (peft's exclude_modules)."""
    more = {"exclude_modules": exclude} if exclude else {}
    if kind in LYCORIS:
        return {"r": rank, "alpha": alpha, "target_modules": sorted(targets), **more}
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0,
            "init_lora_weights": True, "use_dora": kind == "dora", "lora_bias": False, **more}


def save_lora_file(path: str | Path, layers: Mapping[str, Mapping[str, torch.Tensor]],
                   adapters: Mapping[str, dict], info: Mapping[str, str], kind: str = "lora") -> Path:
    """Write a diffusers-format LoRA .safetensors atomically.

    layers:   component ('unet' / 'text_encoder') -> PEFT state dict
    adapters: component -> adapter_metadata(...)
    info:     boothkit facts, stored as ``boothkit.<key>`` string metadata
    """
    from safetensors.torch import save

    tensors = {f"{comp}.{k}": v.detach().to("cpu").contiguous() for comp, sd in layers.items() for k, v in sd.items()}
    packed = {f"{comp}.{k}": v for comp, meta in adapters.items() for k, v in meta.items()}
    # diffusers must not read a LoKr/LoHa config as a LoraConfig: it cannot load those files anyway
    config_key = "boothkit.adapter_config" if kind in LYCORIS else "lora_adapter_metadata"
    metadata = {"format": "pt", config_key: json.dumps(packed, indent=2, sort_keys=True)}
    metadata.update({f"boothkit.{k}": str(v) for k, v in info.items()})
    metadata["boothkit.adapter"] = kind
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def lora_file(path: str | Path) -> Path:
    """Resolve a boothkit output folder or a .safetensors file to the LoRA file it names."""
    p = Path(path)
    if p.is_dir():
        pickled = p / LORA_PICKLE
        p = pickled if not (p / LORA_FILE).is_file() and pickled.is_file() else p / LORA_FILE
    if not p.is_file():
        raise BoothkitError(f"--lora {path}: no LoRA file found (expected a folder with {LORA_FILE} or a .safetensors file)")
    if is_pickle(p):
        return as_safetensors(p, "--lora")  # refused unless --allow-pickle; then a weights-only converted copy
    if p.suffix != ".safetensors":
        raise BoothkitError(f"--lora {path}: not a .safetensors LoRA file")
    return p


def lora_header(path: str | Path) -> tuple[Path, dict[str, str], list[str]]:
    """The LoRA file `path` names, its metadata and tensor names, read without loading weights. A damaged file,
    another kind of file or a safetensors file without LoRA weights is a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), "pt") as fh:
            meta, keys = dict(fh.metadata() or {}), list(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise BoothkitError(f"--lora {path}: not a LoRA safetensors file ({first_line(exc)})") from None
    # diffusers' own test of a LoRA checkpoint is that its names say 'lora' (PEFT, kohya, ComfyUI and LyCORIS do);
    # boothkit's LoKr/LoHa files carry peft's lokr_/hada_ names
    if not keys or not any(t in k for k in keys for t in ("lora", ".lokr_", ".hada_")):
        first = f"first tensor '{keys[0]}'" if keys else "no tensors"
        raise BoothkitError(f"--lora {path}: not a LoRA safetensors file ({first}; LoRA weights are named *lora*)")
    return file, meta, keys


def read_lora_info(path: str | Path) -> dict[str, str]:
    """boothkit.* metadata of a LoRA file (empty for files made by other trainers)."""
    meta = lora_header(path)[1]
    return {k[len("boothkit."):]: v for k, v in meta.items() if k.startswith("boothkit.")}


def lycoris_config(file: Path, meta: Mapping[str, str], given: str) -> dict:
    """``boothkit.adapter_config`` of a LoKr/LoHa file: component -> {r, alpha, target_modules}."""
    try:
        packed = json.loads(meta["boothkit.adapter_config"])
        out: dict[str, dict] = {}
        for key, value in packed.items():
            comp, _, field = key.partition(".")
            out.setdefault(comp, {})[field] = value
        return out
    except (KeyError, ValueError, AttributeError):
        raise BoothkitError(f"--lora {given}: its boothkit.adapter_config metadata is missing or damaged") from None
