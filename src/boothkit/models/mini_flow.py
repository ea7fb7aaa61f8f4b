"""The built-in `mini-flow` model's architecture and its shipped folder: `mini`'s sibling in FLUX.1's architecture
(weights from boothkit.mini's `flow` stage, docs/mini.md).

A FluxPipeline at small size, all of its parts plain diffusers and transformers classes:
- transformer: FluxTransformer2DModel, double-stream then single-stream blocks, RoPE over the 2x2-packed latents
  (64 px -> 16x16x4 latents -> 8x8 tokens of 16 channels); no guidance embedding (FLUX.1 [schnell]'s layout):
  FLUX.1 [dev]'s embedding is distilled from a guided teacher, which cannot be had here, so mini-flow learns
  with 10% empty captions, as `mini` does, and samples with true classifier-free guidance
  (FluxPipeline's `true_cfg_scale` with `negative_prompt=""`);
- vae: `mini`'s trained AutoencoderKL (f=4, 4 channels), its latents shifted and scaled by their measured mean
  and 1/std (`shift_factor`, `scaling_factor`: FluxPipeline reads both);
- text_encoder: `mini`'s trained CLIPTextModel, frozen: its pooled output (CLIP-L's role in FLUX.1);
- text_encoder_2: a small T5 v1.1 encoder (gated GELU) trained with the transformer, with boothkit's trained
  T5 tokenizer (t5_tokenizer), at most T5_MAX_LENGTH tokens;
- scheduler: FlowMatchEulerDiscreteScheduler, FLUX.1 [schnell]'s static shift 1.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..core.errors import ModelError
from ..core.files import boothkit_home, build_once
from .mini import MINI, mini_dir, tokenizer
from .t5_tokenizer import write_t5_tokenizer_files

MINI_FLOW = "mini-flow"  # pretrained on the emoji world (boothkit.mini's flow stage)
MARKER = "BOOTHKIT_MINI_FLOW.json"
EMOJI_MODELS = (MINI, MINI_FLOW)  # pretrained on the emoji world: mini's evaluators judge them, its subjects fit
T5_MAX_LENGTH = 40  # 99.9% of the scenes' captions fit (the median is 17 T5 tokens)
# FLUX.1 [schnell]'s scheduler: a static shift; at 64 tokens Flux's resolution shift would be ~1.6, tuned for
# 256-4096 tokens of 16-channel latents; 8x8 tokens of 4-channel latents are far fewer numbers to noise
MINI_FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# the transformer's size, chosen from measured step times (docs/mini.md): width 256 (4 heads of 64)
TRANSFORMER = dict(num_layers=3, num_single_layers=6, attention_head_dim=64, num_attention_heads=4)
T5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=384, num_layers=3)
CLIP_WIDTH = 128  # mini's text encoder: the pooled projection's width


def mini_flow_dir() -> Path:
    """Folder of the shipped weights (a FluxPipeline folder under model/, and recipe.json) once a run ships."""
    return Path(__file__).resolve().parent.parent / "assets" / "mini_flow"


def make_transformer(**overrides: Any):
    """The FluxTransformer2DModel, random weights; `overrides` change TRANSFORMER's sizes (for measuring)."""
    from diffusers import FluxTransformer2DModel

    size = {**TRANSFORMER, **overrides}
    head = size["attention_head_dim"]
    rows = (head - head // 8) // 2 // 2 * 2  # RoPE: Flux's (16, 56, 56) of 128 -> (text index, row, column)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4,  # 4-channel latents packed 2x2 into tokens
        joint_attention_dim=T5["d_model"], pooled_projection_dim=CLIP_WIDTH, guidance_embeds=False,
        axes_dims_rope=(head - 2 * rows, rows, rows), **size)


def make_t5(vocab_size: int, **overrides: Any):
    """A T5 v1.1 encoder as FLUX.1's t5-v1_1-xxl (gated GELU, untied head), small; `vocab_size` is the tokenizer's
    length rounded up to a multiple of 128, as T5's."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=-(-vocab_size // 128) * 128, relative_attention_num_buckets=16, relative_attention_max_distance=48,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, **{**T5, **overrides}))


def t5_tokenizer(folder: Path):
    """Write the trained T5 tokenizer into `folder` (limited to T5_MAX_LENGTH tokens) and load it."""
    from transformers import T5TokenizerFast

    write_t5_tokenizer_files(folder, model_max_length=T5_MAX_LENGTH)
    return T5TokenizerFast.from_pretrained(folder)


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**MINI_FLOW_SCHEDULER)


def mini_vae(shift_factor: float = 0.0, scaling_factor: float | None = None):
    """`mini`'s shipped VAE in float32, with the latent shift and scale mini-flow learns on."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(mini_dir() / "model" / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=float(shift_factor),
                           scaling_factor=float(vae.config.scaling_factor if scaling_factor is None else scaling_factor))
    return vae


def mini_clip():
    """`mini`'s shipped CLIP text encoder in float32 (its pooled output conditions mini-flow)."""
    import torch
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(mini_dir() / "model" / "text_encoder", torch_dtype=torch.float32)


def flux_pipeline(transformer, text_encoder_2, tokenizer_2, vae, text_encoder=None):
    """A FluxPipeline of mini-flow's parts (mini's CLIP and its tokenizer unless given)."""
    from diffusers import FluxPipeline

    return FluxPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder or mini_clip(),
                        tokenizer=tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        scheduler=make_scheduler())


def shipped_version() -> str:
    """Short hash of the shipped recipe.json: the cache folder is rebuilt when new weights ship."""
    if not (mini_flow_dir() / "recipe.json").is_file():
        raise ModelError(f"'{MINI_FLOW}' weights are not in this install ({mini_flow_dir()} has no recipe.json); "
                         "run the recipe in docs/mini.md (stages flow, flow-ship), or use --model tiny-flux")
    return recipe_version(mini_flow_dir())


def recipe_version(shipped: Path) -> str:
    return hashlib.sha256((shipped / "recipe.json").read_bytes()).hexdigest()[:12]


def assemble(shipped: Path, folder: Path) -> None:
    """Write the float32 FluxPipeline folder of mini-flow into `folder` from a shipped one (`shipped`/model holds
    only what mini-flow trained, fp16; `shipped`/recipe.json the latents' shift and scale, the guidance and the
    size it draws with), with `mini`'s frozen CLIP text encoder and VAE, and the marker."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast

    recipe = json.loads((shipped / "recipe.json").read_text())
    model, load = shipped / "model", dict(torch_dtype=torch.float32)
    pipe = flux_pipeline(FluxTransformer2DModel.from_pretrained(model / "transformer", **load),
                         T5EncoderModel.from_pretrained(model / "text_encoder_2", **load),
                         T5TokenizerFast.from_pretrained(model / "tokenizer_2"), mini_vae(**recipe["latents"]))
    pipe.save_pretrained(folder, safe_serialization=True)
    version = recipe_version(shipped)
    # resolution and guidance: what boothkit draws it with by default (models.loading reads the marker)
    (folder / MARKER).write_text(json.dumps({"name": MINI_FLOW, "version": version, "steps": recipe["steps"],
                                             "resolution": recipe["resolution"], "guidance": recipe["guidance"]},
                                            indent=2))


def mini_flow_path() -> Path:
    """The usable float32 FluxPipeline folder of `mini-flow`, built from the shipped weights on first use."""
    folder = boothkit_home() / "models" / f"{MINI_FLOW}-model-{shipped_version()}"
    return build_once(folder, lambda tmp: assemble(mini_flow_dir(), tmp), marker=MARKER)
