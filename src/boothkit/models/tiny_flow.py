"""The built-in `tiny-flux` and `tiny-sd3` models: FLUX.1-dev's and SD3.5's architectures (rectified-flow
transformers with CLIP and T5 text encoders) at toy size with random weights, built deterministically from a fixed
seed and cached as standard diffusers folders, like `tiny` (tiny.py), so the flow families can run offline on a CPU.
The classes are diffusers' and transformers' own, so module names are the real models'; the T5 tokenizer is trained
here (t5_tokenizer), since none can be downloaded."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.files import boothkit_home, build_once
from .clip_tokenizer import write_clip_tokenizer_files
from .t5_tokenizer import write_t5_tokenizer_files
from .tiny import TINY_RESOLUTION, TINY_SEED

TINY_FLUX = "tiny-flux"  # FLUX.1-dev's architecture at toy size, random weights
TINY_SD3 = "tiny-sd3"  # SD3.5's architecture at toy size, random weights
TINY_FLUX_VERSION = "tiny-flux-v1"
TINY_SD3_VERSION = "tiny-sd3-v1"
TINY_FLUX_SEED = TINY_SEED + 2  # tiny and tiny-xl use +0 and +1
TINY_SD3_SEED = TINY_SEED + 3
T5_MAX_LENGTH = 32  # the T5 tokenizers' model_max_length: short prompts keep the toy transformers' sequences short
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=2, bos_token_id=49406,
             eos_token_id=49407, pad_token_id=49407)


def _vae(scaling_factor: float, shift_factor: float) -> Any:
    """A 16-channel AutoencoderKL as Flux's and SD3's: four blocks (a scale factor of 8: 64 px -> 8x8 latents), no
    quant convs, latents shifted and scaled by the real VAEs' factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=TINY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor)


def _t5(tokenizer_dir: Path, d_model: int) -> tuple[Any, Any]:
    """A T5 v1.1 encoder (gated GELU, untied head, as FLUX.1's and SD3's t5-v1_1-xxl) and its tokenizer; the model's
    vocabulary is the tokenizer's rounded up to a multiple of 128, as T5's (32,100 tokens, 32,128 embeddings)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    write_t5_tokenizer_files(tokenizer_dir, model_max_length=T5_MAX_LENGTH)
    tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir)
    encoder = T5EncoderModel(T5Config(
        vocab_size=-(-len(tokenizer) // 128) * 128, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
        num_heads=d_model // 8, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    return encoder, tokenizer


def _tiny_flux_components(tokenizer_dir: Path) -> dict[str, Any]:
    """FluxPipeline's components with FLUX.1-dev's wiring: CLIP-L's pooled output and T5's sequence condition a
    transformer of double-stream then single-stream blocks, with guidance embedded (dev is guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(TINY_FLUX_SEED)
    clip_width, t5_width = 16, 32  # unequal, as CLIP-L's 768 and T5-XXL's 4096, so a mixed-up wiring fails
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=clip_width, intermediate_size=2 * clip_width, num_attention_heads=2, projection_dim=clip_width,
        hidden_act="quick_gelu", **_CLIP))
    text_encoder_2, tokenizer_2 = _t5(tokenizer_dir / "t5", t5_width)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 16,  # the 16-channel latents are packed 2x2 into tokens
        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=t5_width, pooled_projection_dim=clip_width, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))  # RoPE over (text index, row, column), summing to the head dim as (16, 56, 56)
    # FLUX.1-dev's scheduler: the shift grows with the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    return dict(transformer=transformer, vae=_vae(0.3611, 0.1159), text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler)


def _tiny_sd3_components(tokenizer_dir: Path) -> dict[str, Any]:
    """StableDiffusion3Pipeline's components with SD3.5's wiring: two CLIPs with projection (CLIP-L, CLIP-G: their
    penultimate states and pooled projections) and T5 condition an MMDiT with RMS-normed q/k; its first block has
    the second attention of SD3.5 Medium's MMDiT-X."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(TINY_SD3_SEED)
    widths, t5_width = (8, 16), 32  # CLIP-L and CLIP-G differ (768, 1280); T5 is wider than both together
    text_encoder, text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=w, intermediate_size=2 * w, num_attention_heads=2, projection_dim=w, hidden_act=act, **_CLIP))
        for w, act in zip(widths, ("quick_gelu", "gelu")))
    text_encoder_3, tokenizer_3 = _t5(tokenizer_dir / "t5", t5_width)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
        pooled_projection_dim=sum(widths), pos_embed_max_size=16,  # 16x16 patches: up to 256 px
        dual_attention_layers=(0,), qk_norm="rms_norm")
    files = (str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    tok = dict(pad_token="<|endoftext|>", model_max_length=77)
    # the second tokenizer pads with "!" as SD3's (CLIP-G's) does
    return dict(transformer=transformer, vae=_vae(1.5305, 0.0609), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                text_encoder=text_encoder, tokenizer=CLIPTokenizer(*files, **tok),
                text_encoder_2=text_encoder_2, tokenizer_2=CLIPTokenizer(*files, **{**tok, "pad_token": "!"}),
                text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _build(folder: Path, pipeline: str, components, version: str, seed: int, family: str, note: str) -> None:
    import diffusers

    with tempfile.TemporaryDirectory() as tok_dir, torch.random.fork_rng():
        write_clip_tokenizer_files(Path(tok_dir))
        pipe = getattr(diffusers, pipeline)(**components(Path(tok_dir)))
        pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "BOOTHKIT_TINY.json").write_text(json.dumps({
        "name": version, "seed": seed, "resolution": TINY_RESOLUTION, "family": family, "note": note}, indent=2))


def build_tiny_flux_model(folder: Path) -> None:
    """Build tiny-flux deterministically and save it as a diffusers FluxPipeline folder at `folder`."""
    _build(folder, "FluxPipeline", _tiny_flux_components, TINY_FLUX_VERSION, TINY_FLUX_SEED, "flux",
           "random weights: FLUX.1-dev's architecture at toy size, for plumbing and tests")


def build_tiny_sd3_model(folder: Path) -> None:
    """Build tiny-sd3 deterministically and save it as a diffusers StableDiffusion3Pipeline folder at `folder`."""
    _build(folder, "StableDiffusion3Pipeline", _tiny_sd3_components, TINY_SD3_VERSION, TINY_SD3_SEED, "sd3",
           "random weights: SD3.5's architecture at toy size, for plumbing and tests")


def tiny_flux_model_path() -> Path:
    """The cached tiny-flux model folder, built on first use."""
    return build_once(boothkit_home() / "models" / TINY_FLUX_VERSION, build_tiny_flux_model)


def tiny_sd3_model_path() -> Path:
    """The cached tiny-sd3 model folder, built on first use."""
    return build_once(boothkit_home() / "models" / TINY_SD3_VERSION, build_tiny_sd3_model)
