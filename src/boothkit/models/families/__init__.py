"""Model families: everything that differs between Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and FLUX.1, behind one
interface (`base.Family`).

Training, losses, prior preservation, checkpoints, generation, sweeps and metrics never ask which family they run;
they ask the pipeline's `Family` for its denoiser and text encoders, how a prompt becomes conditioning, how the
denoiser is called, which objective it learns, its LoRA components and its kohya names. A family is chosen from the
pipeline class (`model_index.json`'s `_class_name`, or the keys of a single-file checkpoint). The UNet families
live in `unet`, the flow-matching transformers in `flow`; a new family is one more instance in one of them (or a
module beside them) and one entry in `FAMILIES`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ...core.errors import ConfigError, ModelError
from .base import Conditioning, Family
from .flow import FLUX, SD3, FlowFamily
from .unet import SD, SDXL, UNetFamily, micro_conditioning

__all__ = ["Conditioning", "Family", "FlowFamily", "UNetFamily", "SD", "SDXL", "SD3", "FLUX", "FAMILIES",
           "LORA_COMPONENTS", "family_of", "family_of_index", "family_of_folder", "family_of_single_file",
           "micro_conditioning", "check_method", "by_name"]

FAMILIES = {f.pipeline_class: f for f in (SD, SDXL, SD3, FLUX)}
# every LoRA component any family has, in file order: what a LoRA file may hold
LORA_COMPONENTS = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))
TRAINED = ", ".join(f.label for f in FAMILIES.values())


def by_name(name: str) -> Family:
    """The family a LoRA file's boothkit.family names ("sd", "flux", ...)."""
    for f in FAMILIES.values():
        if f.name == name:
            return f
    raise ModelError(f"unknown model family {name!r} (boothkit trains {TRAINED})")


def family_of(pipe) -> Family:
    """The family of a loaded pipeline."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise ModelError(f"{type(pipe).__name__} is not a model family boothkit trains ({TRAINED})")


def family_of_index(model_index: Mapping[str, Any], where: str) -> Family:
    """The family named by a diffusers folder's model_index.json."""
    name = model_index.get("_class_name", "")
    if name not in FAMILIES:
        raise ModelError(f"--model {where}: a {name or 'unknown'} model; boothkit trains {TRAINED} "
                         f"({', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_folder(folder: str | Path) -> Family:
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {folder}: cannot read model_index.json ({exc})") from None
    return family_of_index(index, str(folder))


# key prefixes that tell a single-file checkpoint's family (original BFL / Stability layouts, with or without
# ComfyUI's "model.diffusion_model." in front)
_SINGLE_FILE_MARKS = (("double_blocks.", FLUX), ("joint_blocks.", SD3), ("conditioner.embedders.1.", SDXL))


def family_of_single_file(path: str | Path) -> Family:
    """FLUX.1 files hold double_blocks, SD3 files joint_blocks, SDXL ones a second text encoder under
    conditioner.embedders.1; the rest are SD 1.x/2.x, if they hold a UNet at all."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    for mark, family in _SINGLE_FILE_MARKS:
        if any(k.startswith(mark) or k.startswith("model.diffusion_model." + mark) for k in keys):
            return family
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(f"--model {path}: not a Stable Diffusion, SDXL, SD3 or FLUX.1 checkpoint (no denoiser "
                         f"weights among its {len(keys)} tensors; first '{keys[0] if keys else ''}')")
    return SD


def check_method(family: Family, method: str, adapter: str) -> None:
    """A method or adapter the family does not train is refused, naming the families that do."""
    for kind, value, have, flag in (("method", method, family.methods, "lora.method (--method)"),
                                    ("adapter", adapter, family.adapters, "lora.adapter (--adapter)")):
        if value not in have:
            others = [f.label for f in FAMILIES.values() if value in getattr(f, kind + "s")]
            raise ConfigError(f"{flag} {value}: not supported for {family.label} models yet (it is for "
                              f"{', '.join(others)}); {family.label} trains {kind} {', '.join(have)}")
