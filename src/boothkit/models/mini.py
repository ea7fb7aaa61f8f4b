"""The built-in `mini` model's architecture and its shipped folders (weights from boothkit.mini.pretrain's recipe).

`mini` is a Stable Diffusion 1.x pipeline at small size, pretrained on the emoji world (boothkit.mini.emoji,
boothkit.mini.scenes): 64 px, a VAE with f=4 (16x16x4 latents), a 9 M-parameter UNet, a 3-layer CLIP text encoder
and the real CLIP tokenizer. Its evaluators (`--clip-model mini`, `--dino-model mini`) ship beside it.
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import ModelError
from ..core.files import boothkit_home, build_once
from .clip_tokenizer import write_clip_tokenizer_files

MINI = "mini"  # pretrained on the emoji world (boothkit.mini)
MINI_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def mini_dir() -> Path:
    """Folder of the shipped weights: model/ (diffusers), clip/ and dino/ (transformers)."""
    return Path(__file__).resolve().parent.parent / "assets" / "mini"


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                         block_out_channels=(32, 64, 64), sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def make_unet():
    from diffusers import UNet2DConditionModel

    # attention_head_dim is diffusers' (historically misnamed) number of heads
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        norm_num_groups=32, cross_attention_dim=128, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def make_clip():
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4),
        projection_dim=64))


def make_dino():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=4, num_attention_heads=4), add_pooling_layer=False)


def tokenizer():
    """The real CLIP tokenizer, built from open_clip's vocabulary file."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_clip_tokenizer_files(Path(d))
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                             pad_token="<|endoftext|>", model_max_length=77)




def shipped_version() -> str:
    """Short hash of the shipped recipe.json: the cache folders are rebuilt when new weights ship."""
    import hashlib

    recipe = mini_dir() / "recipe.json"
    if not recipe.is_file():
        raise ModelError(f"'mini' weights are not in this install ({mini_dir()} has no recipe.json); "
                         "run the recipe in docs/mini.md, or use --model tiny")
    return hashlib.sha256(recipe.read_bytes()).hexdigest()[:12]


def _marker(folder: Path, kind: str) -> None:
    import json

    recipe = json.loads((mini_dir() / "recipe.json").read_text())
    (folder / "BOOTHKIT_MINI.json").write_text(json.dumps({"name": f"mini-{kind}", "version": shipped_version(),
                                                          "recipe": recipe}, indent=2))


def _build_model(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = mini_dir() / "model"
    load = dict(torch_dtype=torch.float32)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(src / "vae", **load), unet=UNet2DConditionModel.from_pretrained(src / "unet", **load),
        text_encoder=CLIPTextModel.from_pretrained(src / "text_encoder", **load), tokenizer=tokenizer(),
        scheduler=DDIMScheduler.from_pretrained(src / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _marker(folder, "model")


def _build_clip(folder: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    CLIPModel.from_pretrained(mini_dir() / "clip", torch_dtype=torch.float32).save_pretrained(folder)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    CLIPProcessor(image_processor=image_proc, tokenizer=tokenizer()).save_pretrained(folder)
    _marker(folder, "clip")


def _build_dino(folder: Path) -> None:
    import torch
    from transformers import ViTImageProcessor, ViTModel

    ViTModel.from_pretrained(mini_dir() / "dino", torch_dtype=torch.float32, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    _marker(folder, "dino")


def mini_path(kind: str = "model") -> Path:
    """The usable folder of `mini` ('model': diffusers; 'clip', 'dino': transformers), built from the shipped
    fp16 weights on first use: float32, with the tokenizer or image processor, loadable by plain diffusers."""
    build = {"model": _build_model, "clip": _build_clip, "dino": _build_dino}[kind]
    folder = boothkit_home() / ("models" if kind == "model" else "evaluators") / f"mini-{kind}-{shipped_version()}"
    return build_once(folder, build, marker="BOOTHKIT_MINI.json")
