"""Model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, behind one interface.

Training, losses, prior preservation, checkpoints, generation, sweeps and metrics never ask which family they
run; they ask the pipeline's `Family` for its text encoders, how a prompt becomes UNet inputs, its LoRA
components and its kohya names. A family is chosen from the pipeline class (`model_index.json`'s `_class_name`,
or the keys of a single-file checkpoint). Adding SD3 or Flux means one more `Family` here (their transformer
backbones also need a LoRA target list and a loss on flow-matching targets; see docs/families.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..core.errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str                       # "sd" | "sdxl"
    pipeline_class: str             # the diffusers pipeline that loads and samples it
    text_encoders: tuple[str, ...]  # pipeline attributes, in the order their hidden states are concatenated
    tokenizers: tuple[str, ...]
    kohya_prefixes: Mapping[str, str]  # LoRA component -> kohya/A1111 module-name prefix
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments
    micro_conditioned: bool = False  # the UNet takes original size / crop / target size (SDXL)
    # text encoder -> its key in an A1111/ComfyUI embedding file (Textual Inversion)
    embedding_keys: Mapping[str, str] = field(default_factory=lambda: {"text_encoder": "emb_params"})

    @property
    def components(self) -> tuple[str, ...]:
        """The components a LoRA file of this family may hold."""
        return ("unet",) + self.text_encoders

    def pipeline(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def encode(self, encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> "Conditioning":
        """Token ids (one tensor per tokenizer) -> what the UNet is conditioned on."""
        if len(encoders) == 1:
            return Conditioning(encoders[0](ids[0])[0], None)
        # SDXL, as StableDiffusionXLPipeline.encode_prompt: the penultimate hidden states of both encoders,
        # concatenated, and the second (projection) encoder's pooled output
        hidden, pooled = [], None
        for encoder, tokens in zip(encoders, ids):
            out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return Conditioning(torch.cat(hidden, dim=-1), pooled)


@dataclass
class Conditioning:
    hidden: torch.Tensor            # encoder_hidden_states
    pooled: Optional[torch.Tensor]  # SDXL's text_embeds

    def unet_kwargs(self, time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments of UNet2DConditionModel.forward beyond (sample, timestep)."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            if time_ids is None:
                raise ModelError("an SDXL UNet needs micro-conditioning time ids")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": time_ids.to(self.hidden)}
        return kwargs


SD = Family("sd", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), {"text_encoder": "lora_te_"},
            {"safety_checker": None, "requires_safety_checker": False})
SDXL = Family("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
              {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, micro_conditioned=True,
              embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"})
FAMILIES = {"StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL}
# every LoRA component any family has, in file order: what a LoRA file may hold
LORA_COMPONENTS = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))


def family_of(pipe) -> Family:
    """The family of a loaded pipeline."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise ModelError(f"{type(pipe).__name__} is not a model family boothkit trains (SD 1.x/2.x, SDXL)")


def family_of_index(model_index: Mapping[str, Any], where: str) -> Family:
    """The family named by a diffusers folder's model_index.json."""
    name = model_index.get("_class_name", "")
    if name not in FAMILIES:
        raise ModelError(f"--model {where}: a {name or 'unknown'} model; boothkit trains "
                         f"{', '.join(FAMILIES)} models")
    return FAMILIES[name]


def family_of_folder(folder: str | Path) -> Family:
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {folder}: cannot read model_index.json ({exc})") from None
    return family_of_index(index, str(folder))


def family_of_single_file(path: str | Path) -> Family:
    """SDXL single files carry a second text encoder under conditioner.embedders.1; SD 1.x/2.x ones do not."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return SDXL if any(k.startswith("conditioner.embedders.1.") for k in fh.keys()) else SD


def micro_conditioning(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]
                       ) -> torch.Tensor:
    """SDXL's add_time_ids of one picture: original size, crop top-left, target size (all height, width)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)
