"""The flow-matching transformer families: Stable Diffusion 3/3.5 (MMDiT) and FLUX.1 (double and single stream
blocks on 2x2-packed latents). Both learn rectified flow (train.objectives' "flow"); what differs is how a prompt is
encoded and how the transformer is called, written here as diffusers' pipelines and DreamBooth scripts do it
(StableDiffusion3Pipeline.encode_prompt, FluxPipeline.encode_prompt / _pack_latents / _prepare_latent_image_ids,
examples/dreambooth/train_dreambooth_lora_{sd3,flux}.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Conditioning, Family

# attention projections of the joint (MMDiT) blocks: image stream to_*, text stream add_*_proj / to_add_out
JOINT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# Flux's single-stream blocks add their MLP input and fused output projection (kohya's linear1 / linear2)
FLUX_TARGETS = JOINT_TARGETS + ("proj_mlp", "proj_out")
FLOW_METHODS = ("lora", "full")  # Textual Inversion on the CLIP embeddings alone is not offered yet


@dataclass(frozen=True)
class FlowFamily(Family):
    objective: str = "flow"
    denoiser: str = "transformer"
    samplers: Optional[tuple[str, ...]] = ("flow-euler",)
    methods: tuple[str, ...] = FLOW_METHODS
    train_guidance: float = 1.0  # Flux.1-dev's guidance embedding during training (kohya's and ai-toolkit's 1.0)

    def sample_kwargs(self, pipe) -> dict:
        # the pipelines pad T5's prompt to their own default (Flux 512, SD3 256), not the tokenizer's limit
        last = len(self.tokenizers) - 1
        return {"max_sequence_length": self.token_length(getattr(pipe, self.tokenizers[last]), last)}

    def probe_forward(self, model, resolution: int, batch: int = 1,
                      cap: bool = True) -> Callable[[torch.nn.Module], torch.Tensor]:
        cfg = model.config
        side = 2 * max(1, min(resolution // 16, 32) if cap else resolution // 16)  # even: 2x2 patches
        p = next(model.parameters())
        sample = torch.randn(batch, self.latent_channels(cfg), side, side, device=p.device, dtype=p.dtype)
        cond = Conditioning(torch.randn(batch, 77, cfg.joint_attention_dim, device=p.device, dtype=p.dtype),
                            torch.randn(batch, cfg.pooled_projection_dim, device=p.device, dtype=p.dtype))
        t = torch.full((batch,), 500.0, device=p.device)
        return lambda m: self.denoise(m, sample.clone().requires_grad_(True), t, cond)

    def native_resolution(self, pipe) -> int:
        # built-in models record their size; real SD3 transformers say theirs (sample_size), Flux's pipeline 1024
        own = getattr(pipe, "boothkit_resolution", None)
        if own:
            return int(own)
        sample = getattr(pipe.transformer.config, "sample_size", None)
        return int(sample or pipe.default_sample_size) * int(pipe.vae_scale_factor)


@dataclass(frozen=True)
class SD3Family(FlowFamily):
    def encode(self, encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
        """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side, padded
        to T5's width and followed by T5's sequence; the pooled vector is both CLIPs' projections."""
        hidden, pooled = [], []
        for encoder, tokens in zip(encoders[:2], ids[:2]):
            out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = encoders[2](ids[2])[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def denoise(self, model, noisy, timesteps, cond: Conditioning, time_ids=None):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.hidden,
                     pooled_projections=cond.pooled, return_dict=False)[0]

    latent_channels = staticmethod(lambda cfg: cfg.in_channels)


@dataclass(frozen=True)
class FluxFamily(FlowFamily):
    size_step: int = 16  # 2x2 packing of 8x latents

    @staticmethod
    def _embeds_guidance(pipe) -> bool:
        return bool(pipe.transformer.config.guidance_embeds)

    def guidance_of(self, pipe) -> float:
        # dev embeds its distilled guidance (3.5); a model without the embedding (schnell) draws without guidance
        # unless its folder asks for true classifier-free guidance (mini-flow records its own)
        own = getattr(pipe, "boothkit_guidance", None)
        return own or (self.default_guidance if self._embeds_guidance(pipe) else 1.0)

    def reads_negative_prompts(self, pipe) -> bool:
        return not self._embeds_guidance(pipe)

    def guidance_kwargs(self, pipe, guidance: float, negative_prompt: str, n: int) -> dict:
        """dev: the guidance embedding (negatives are not read: the guidance is distilled into the model). Without
        it: FluxPipeline's true classifier-free guidance (`true_cfg_scale`, an empty negative by default) above 1."""
        if self._embeds_guidance(pipe):
            return {"guidance_scale": guidance}
        if guidance <= 1.0:
            return {}
        return {"true_cfg_scale": guidance, "negative_prompt": [negative_prompt] * n}

    def encode(self, encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
        """As FluxPipeline.encode_prompt: CLIP's pooled output and T5's sequence."""
        pooled = encoders[0](ids[0], output_hidden_states=False).pooler_output
        return Conditioning(encoders[1](ids[1], output_hidden_states=False)[0], pooled)

    def denoise(self, model, noisy, timesteps, cond: Conditioning, time_ids=None):
        """Pack 2x2 latent patches into tokens, call the transformer with its position ids (and guidance 1 when
        it embeds guidance, as dev does), unpack the prediction to the latents' layout."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if getattr(model, "module", model).config.guidance_embeds:  # under DDP the model is wrapped
            guidance = torch.full((b,), self.train_guidance, device=noisy.device, dtype=torch.float32)
        pred = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                     pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden, txt_ids=txt_ids,
                     img_ids=img_ids, return_dict=False)[0]
        return unpack(pred, h, w)

    latent_channels = staticmethod(lambda cfg: cfg.in_channels // 4)  # 2x2 patches packed into channels


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FluxPipeline._unpack_latents for a latent grid of h x w (it takes pixel sizes and the VAE factor)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height=h * 8, width=w * 8, vae_scale_factor=8)


SD3 = SD3Family("sd3", "SD3/3.5", "StableDiffusion3Pipeline", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                ("tokenizer", "tokenizer_2", "tokenizer_3"), {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                JOINT_TARGETS, lora_encoders=("text_encoder", "text_encoder_2"),
                quantizable=("transformer", "text_encoder_3"), size_step=16,  # 8x VAE, 2x2 patches
                token_lengths=(None, None, 256), default_guidance=7.0,
                embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"})
FLUX = FluxFamily("flux", "FLUX.1", "FluxPipeline", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
                  {"text_encoder": "lora_te1_"}, FLUX_TARGETS, lora_encoders=("text_encoder",),
                  quantizable=("transformer", "text_encoder_2"),
                  lora_exclude="^proj_out$",  # the final layer; the single blocks' proj_out is a target
                  token_lengths=(None, 512), default_guidance=3.5, embedding_keys={"text_encoder": "clip_l"})
