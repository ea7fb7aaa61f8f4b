"""`sd15-shape`: Stable Diffusion 1.5's exact architecture with random weights, for measuring speed and memory.

A model costs what its shapes cost, not what its weights say: UNet 859.5 M parameters, CLIP ViT-L/14 text encoder,
the SD VAE, PNDM. Built offline on first use (about a minute, 2 GB in fp16) and cached under BOOTHKIT_HOME; never
shipped, and its pictures are noise.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..core.files import boothkit_home, build_once
from .clip_tokenizer import write_clip_tokenizer_files

SD15_SHAPE = "sd15-shape"
SD15_SHAPE_VERSION = "sd15-shape-v1"


def _components(tokenizer_dir: Path) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 1.5's unet/config.json (hub_ids.SD15)
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_sd15_shape(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tok_dir, torch.random.fork_rng():
        write_clip_tokenizer_files(Path(tok_dir))
        pipe = StableDiffusionPipeline(**_components(Path(tok_dir)), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)  # as real checkpoints ship
    (folder / "BOOTHKIT_SHAPE.json").write_text(json.dumps({
        "name": SD15_SHAPE_VERSION, "note": "Stable Diffusion 1.5's architecture with random weights: for speed and "
                                           "memory measurements only"}, indent=2))


def sd15_shape_path() -> Path:
    return build_once(boothkit_home() / "models" / SD15_SHAPE_VERSION, build_sd15_shape, marker="BOOTHKIT_SHAPE.json")
