"""The built-in `tiny` and `tiny-xl` models: Stable Diffusion's (and SDXL's) architecture at toy size with random
weights, built deterministically from a fixed seed and cached as standard diffusers folders, so everything boothkit
does can run offline on a CPU (pictures show the pipeline working, not image quality)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.files import boothkit_home, build_once
from .clip_tokenizer import write_clip_tokenizer_files

TINY = "tiny"
TINY_XL = "tiny-xl"  # SDXL's architecture at toy size, random weights
TINY_VERSION = "tiny-v1"
TINY_XL_VERSION = "tiny-xl-v1"
TINY_SEED = 20220825  # the DreamBooth paper's arXiv date; any fixed value works
TINY_RESOLUTION = 64


def _tiny_components(tokenizer_dir: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 64, 64), sample_size=TINY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    # Stable Diffusion 1.x's noise schedule; DDIM samples deterministically from it.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_model(folder: Path) -> None:
    """Build the tiny model deterministically and save it as a diffusers folder at `folder`."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tok_dir, torch.random.fork_rng():
        write_clip_tokenizer_files(Path(tok_dir))
        parts = _tiny_components(Path(tok_dir))
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "BOOTHKIT_TINY.json").write_text(json.dumps({
        "name": TINY_VERSION, "seed": TINY_SEED, "resolution": TINY_RESOLUTION,
        "note": "random weights: pictures show the pipeline working, not image quality",
    }, indent=2))


def _tiny_xl_components(tokenizer_dir: Path) -> dict[str, Any]:
    """SDXL's component types and wiring (two CLIP text encoders, the second with projection; a UNet with
    text_time added conditioning) at toy size, like diffusers' own SDXL test model."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(TINY_SEED + 1)
    te_config = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=49407)
    # the two encoders differ in width, as SDXL's do (768 / 1280): single-file loaders tell them apart by it
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **te_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, projection_dim=64, **te_config))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), norm_num_groups=32, cross_attention_dim=32 + 64,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 64,  # six size/crop numbers + pooled text
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 64, 64), sample_size=TINY_RESOLUTION, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    tok = dict(pad_token="<|endoftext|>", model_max_length=77)
    files = (str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    # SDXL's noise schedule and its default sampler
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    # the second tokenizer pads with "!" as SDXL's does
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=CLIPTokenizer(*files, **tok), tokenizer_2=CLIPTokenizer(*files, **{**tok, "pad_token": "!"}),
                scheduler=scheduler)


def build_tiny_xl_model(folder: Path) -> None:
    """Build tiny-xl deterministically and save it as a diffusers StableDiffusionXLPipeline folder."""
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tok_dir, torch.random.fork_rng():
        write_clip_tokenizer_files(Path(tok_dir))
        StableDiffusionXLPipeline(**_tiny_xl_components(Path(tok_dir))).save_pretrained(folder, safe_serialization=True)
    (folder / "BOOTHKIT_TINY.json").write_text(json.dumps({
        "name": TINY_XL_VERSION, "seed": TINY_SEED + 1, "resolution": TINY_RESOLUTION, "family": "sdxl",
        "note": "random weights: SDXL's architecture at toy size, for plumbing and tests",
    }, indent=2))


def tiny_model_path() -> Path:
    """The cached tiny model folder, built on first use."""
    return build_once(boothkit_home() / "models" / TINY_VERSION, build_tiny_model)


def tiny_xl_model_path() -> Path:
    """The cached tiny-xl model folder, built on first use."""
    return build_once(boothkit_home() / "models" / TINY_XL_VERSION, build_tiny_xl_model)
