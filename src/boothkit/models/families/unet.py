"""The UNet families: Stable Diffusion 1.x/2.x and SDXL (ε or v prediction on a DDPM noise schedule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .base import Conditioning, Family

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class UNetFamily(Family):
    def encode(self, encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
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

    def denoise(self, model, noisy, timesteps, cond: Conditioning, time_ids: Optional[torch.Tensor] = None):
        return model(noisy, timesteps, **cond.unet_kwargs(time_ids)).sample

    def native_resolution(self, pipe) -> int:
        """The image size the model was trained at (UNet sample size x VAE scale factor)."""
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def probe_forward(self, model, resolution: int, batch: int = 1,
                      cap: bool = True) -> Callable[[torch.nn.Module], torch.Tensor]:
        cfg = model.config
        side = min(resolution // 8, 32) if cap else resolution // 8  # capped: 256 px for SD
        width = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
        p = next(model.parameters())
        sample = torch.randn(batch, cfg.in_channels, side, side, device=p.device, dtype=p.dtype)
        kwargs: dict = {"encoder_hidden_states": torch.randn(batch, 77, width, device=p.device, dtype=p.dtype)}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and six size numbers
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=p.device, dtype=p.dtype),
                                           "time_ids": torch.ones(batch, 6, device=p.device, dtype=p.dtype) * 64}
        t = torch.full((batch,), 500, device=p.device)

        def forward(m: torch.nn.Module) -> torch.Tensor:
            return m(sample.clone().requires_grad_(True), t, **kwargs).sample
        return forward


SD = UNetFamily("sd", "SD 1.x/2.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",),
                {"text_encoder": "lora_te_"}, UNET_TARGETS,
                pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},
                default_sampler="dpm++2m-karras")
SDXL = UNetFamily("sdxl", "SDXL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                  ("tokenizer", "tokenizer_2"), {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                  UNET_TARGETS, micro_conditioned=True, default_sampler="dpm++2m-karras",
                  embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"})


def micro_conditioning(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]
                       ) -> torch.Tensor:
    """SDXL's add_time_ids of one picture: original size, crop top-left, target size (all height, width)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)
