"""The family interface: what a model family owns, so that training, generation and evaluation never branch on
which family they run.

A family says which pipeline loads it, its denoiser (`unet` or `transformer`) and text encoders, how a prompt
becomes token ids and then conditioning, how the denoiser is called on noisy latents (packing, position ids,
guidance embedding), which training objective it learns (`objective`: the train wing's table of objectives reads
it), its default LoRA targets, sampler names, guidance and native size, and which methods it supports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ...core.errors import ConfigError, ModelError

METHODS = ("lora", "full", "ti", "pivotal")
ADAPTERS = ("lora", "dora", "lokr", "loha")


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: the sequence embeddings and, for SDXL, SD3 and Flux, a pooled vector."""

    hidden: torch.Tensor            # encoder_hidden_states
    pooled: Optional[torch.Tensor]  # SDXL's text_embeds; SD3's and Flux's pooled_projections

    def unet_kwargs(self, time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments of UNet2DConditionModel.forward beyond (sample, timestep)."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            if time_ids is None:
                raise ModelError("an SDXL UNet needs micro-conditioning time ids")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": time_ids.to(self.hidden)}
        return kwargs


@dataclass(frozen=True)
class Family:
    name: str                       # "sd" | "sdxl" | "sd3" | "flux"
    label: str                      # how messages name it ("SD 1.x/2.x", "FLUX.1")
    pipeline_class: str             # the diffusers pipeline that loads and samples it
    text_encoders: tuple[str, ...]  # pipeline attributes, in the order of `tokenizers`
    tokenizers: tuple[str, ...]
    kohya_prefixes: Mapping[str, str]  # LoRA component -> kohya/A1111 module-name prefix
    lora_targets: tuple[str, ...]   # the denoiser's default LoRA targets (peft module-name suffixes)
    denoiser: str = "unet"          # the pipeline attribute that denoises
    objective: str = "diffusion"    # "diffusion" (ε / v prediction) or "flow" (rectified flow); see train.objectives
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments
    micro_conditioned: bool = False  # the UNet takes original size / crop / target size (SDXL)
    # text encoder -> its key in an A1111/ComfyUI embedding file (Textual Inversion)
    embedding_keys: Mapping[str, str] = field(default_factory=lambda: {"text_encoder": "emb_params"})
    lora_encoders: Optional[tuple[str, ...]] = None  # the text encoders LoRA may train (None: all; T5 is never)
    lora_exclude: Optional[str] = None  # a regex of module names the default targets must not reach
    token_lengths: tuple[Optional[int], ...] = ()  # per tokenizer: at most this many tokens (None: its own limit)
    default_guidance: float = 7.5
    samplers: Optional[tuple[str, ...]] = None  # the --scheduler names it samples with (None: every UNet sampler)
    default_sampler: Optional[str] = None  # "auto" class-image sampler (None: the model folder's own)
    size_step: int = 8              # image sides in multiples of this many pixels (Flux packs 2x2 latents: 16)
    quantizable: tuple[str, ...] = ()  # the frozen parts --quantize-base quantizes (the transformer and T5)
    methods: tuple[str, ...] = METHODS
    adapters: tuple[str, ...] = ADAPTERS

    # --------------------------------------------------------------------------------------------- parts

    @property
    def trainable_encoders(self) -> tuple[str, ...]:
        return self.text_encoders if self.lora_encoders is None else self.lora_encoders

    @property
    def components(self) -> tuple[str, ...]:
        """The components a LoRA file of this family may hold."""
        return (self.denoiser,) + self.trainable_encoders

    def pipeline(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    # ------------------------------------------------------------------------------------------ prompts

    def tokenize(self, tokenizers: Sequence, text: str) -> list[torch.Tensor]:
        """One tensor of token ids per tokenizer, padded to the length the family reads."""
        return [tok(text, padding="max_length", max_length=self.token_length(tok, k), truncation=True,
                    return_tensors="pt").input_ids for k, tok in enumerate(tokenizers)]

    def token_length(self, tokenizer, k: int) -> int:
        """How many tokens tokenizer `k` gives the text encoder: its own limit, or less where the family says."""
        limit = self.token_lengths[k] if k < len(self.token_lengths) else None
        return min(int(tokenizer.model_max_length), limit) if limit else int(tokenizer.model_max_length)

    def sample_kwargs(self, pipe) -> dict[str, Any]:
        """Extra arguments of the pipeline's __call__ that make it encode prompts as training does."""
        return {}

    def guidance_of(self, pipe) -> float:
        """The guidance a model draws with by default: what its folder records (a built-in's marker), else the
        family's."""
        return getattr(pipe, "boothkit_guidance", None) or self.default_guidance

    def reads_negative_prompts(self, pipe) -> bool:
        return True

    def guidance_kwargs(self, pipe, guidance: float, negative_prompt: str, n: int) -> dict[str, Any]:
        """The pipeline __call__'s guidance arguments for `n` pictures: classifier-free guidance with a negative
        prompt (the diffusers pipelines' own)."""
        return {"guidance_scale": guidance, "negative_prompt": [negative_prompt] * n if negative_prompt else None}

    def encode(self, encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ denoiser

    def denoise(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The denoiser's prediction for `noisy` latents (B, C, h, w) at `timesteps` (the objective's scale:
        0..999 steps, or σ·1000 for flow families), in the latents' layout."""
        raise NotImplementedError

    def native_resolution(self, pipe) -> int:
        raise NotImplementedError

    def check_size(self, flag: str, value: int, pipe) -> None:
        step = self.size_step * int(pipe.vae_scale_factor) // 8
        if value % step:
            raise ConfigError(f"{flag} {value}: must be a multiple of {step} for {self.label} models")

    def probe_forward(self, model: torch.nn.Module, resolution: int, batch: int = 1,
                      cap: bool = True) -> Callable[[torch.nn.Module], torch.Tensor]:
        """A forward pass of `model` (or a copy of it) on random inputs of `batch` pictures at `resolution` (with
        `cap`, at most 256-512 px: the precision probe compares fp32 with bf16, for which the size matters little),
        whose input needs gradients as LoRA layers' do; the speed bench counts its FLOPs."""
        raise NotImplementedError
