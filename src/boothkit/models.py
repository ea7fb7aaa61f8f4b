"""Model loading (hub ids, local diffusers folders, single-file checkpoints) and the built-in tiny model.

The tiny model is Stable Diffusion's architecture family at toy size with random weights, built
deterministically from a fixed seed and cached as a standard diffusers folder, so everything boothkit
does can run offline on a CPU. Its tokenizer is the real CLIP BPE tokenizer, built from the vocabulary
file that open_clip_torch ships.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import logging

import torch

from .errors import ModelError, first_line
from .files import boothkit_home  # noqa: F401  (re-exported: where built-in models are cached)
from .hub_ids import LOCAL_OR_BUILT_IN, hub_error
from .safety import REFUSAL, as_safetensors, is_pickle, pickle_allowed, pickled_only, refuse_pickle

log = logging.getLogger("boothkit")

TINY = "tiny"
MINI = "mini"  # pretrained on the emoji world; see boothkit.mini
TINY_XL = "tiny-xl"  # SDXL's architecture at toy size, random weights
SD15_SHAPE = "sd15-shape"  # SD 1.5's architecture, random weights: speed and memory only (boothkit.shapes)
BUILT_IN = (TINY, MINI, TINY_XL, SD15_SHAPE)
TINY_VERSION = "tiny-v1"
TINY_XL_VERSION = "tiny-xl-v1"
TINY_SEED = 20220825  # the DreamBooth paper's arXiv date; any fixed value works
TINY_RESOLUTION = 64


# -------------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the BPE's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_vocab_file() -> Path:
    """Path of open_clip's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("open_clip_torch is not installed; it provides the CLIP BPE vocabulary (pip install open_clip_torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelError(f"CLIP BPE vocabulary not found at {path}")
    return path


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json and merges.txt of OpenAI's CLIP tokenizer (49,408 tokens) into `folder`."""
    lines = gzip.open(clip_bpe_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


# ------------------------------------------------------------------------------------------- tiny model

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


def build_once(folder: Path, build: Callable[[Path], None], marker: str = "BOOTHKIT_TINY.json") -> Path:
    """Build a cached folder on first use: into a temp folder beside it, then one rename, so a killed or
    concurrent builder never leaves a half-built folder. `build(tmp)` fills it, `marker` file included."""
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with torch.random.fork_rng():
            build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; its folder is identical
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_model_path() -> Path:
    """The cached tiny model folder, built on first use."""
    return build_once(boothkit_home() / "models" / TINY_VERSION, build_tiny_model)


def tiny_xl_model_path() -> Path:
    """The cached tiny-xl model folder, built on first use."""
    return build_once(boothkit_home() / "models" / TINY_XL_VERSION, build_tiny_xl_model)


def model_ref(spec: str) -> str:
    """A stable name for a model, as metadata and manifests record it: 'tiny' or 'mini' for the built-in models
    (however they were named), an absolute path for local files and folders, the hub id otherwise."""
    if spec in BUILT_IN:
        return spec
    p = Path(spec).expanduser()
    if not p.exists():
        return spec
    p = p.resolve()
    for name, version in ((TINY, TINY_VERSION), (TINY_XL, TINY_XL_VERSION)):
        if p == (boothkit_home() / "models" / version).resolve():
            return name
    return MINI if (p / "BOOTHKIT_MINI.json").is_file() and p.parent == (boothkit_home() / "models").resolve() else str(p)


def model_name(model: str, vae: str | None = None) -> str:
    """model_ref, with the replacement VAE when there is one (class images made with it are other pictures)."""
    return f"{model_ref(model)} + vae {model_ref(vae)}" if vae else model_ref(model)


def is_tiny(spec: str) -> bool:
    return spec in (TINY, TINY_XL) or Path(spec, "BOOTHKIT_TINY.json").is_file()


# ----------------------------------------------------------------------------------------------- loading

def model_path(spec: str) -> str:
    """What `spec` names, for from_pretrained: 'tiny' and 'mini' become their cached folders; others pass through."""
    if spec == MINI:
        from .mini import mini_path

        return str(mini_path("model"))
    if spec == TINY_XL:
        return str(tiny_xl_model_path())
    if spec == SD15_SHAPE:
        from .shapes import sd15_shape_path

        return str(sd15_shape_path())
    return str(tiny_model_path()) if spec == TINY else spec


def load_pipeline(spec: str, *, model_config: str | None = None, revision: str | None = None,
                  dtype: torch.dtype | dict[str, torch.dtype] = torch.float32, vae: str | None = None):
    """Load an SD 1.x/2.x or SDXL pipeline (its family's class) from a built-in name, a local folder, a single
    .safetensors file or a hub id; `vae` replaces its VAE. `dtype`: one for all components, or one per component
    as diffusers takes it ({"default": torch.bfloat16, "vae": torch.float32}): each is loaded straight into its
    dtype, so no full-precision copy of the model is ever held."""
    other = load_vae(vae, component_dtype(dtype, "vae")) if vae else None  # a wrong --vae fails before the slow load
    pipe = _load_pipeline(spec, model_config=model_config, revision=revision, dtype=dtype)
    if other is not None:
        pipe.vae = other
    return pipe


def component_dtype(dtype: torch.dtype | dict[str, torch.dtype], name: str) -> torch.dtype:
    return dtype.get(name, dtype.get("default", torch.float32)) if isinstance(dtype, dict) else dtype


def load_vae(spec: str, dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a VAE folder, a model folder's vae/ subfolder, or a hub id."""
    from diffusers import AutoencoderKL

    path = Path(spec)
    local = path.is_dir()
    if local and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    try:
        if local:
            _check_pickles(path, spec, "--vae")
        return AutoencoderKL.from_pretrained(str(path) if local else spec, dtype=dtype, use_safetensors=_safetensors())
    except ModelError:
        raise
    except Exception as exc:  # diffusers and the hub raise many types; the remedy is the same
        first = first_line(exc)
        said = None if local else hub_error("--vae", spec, exc)
        raise ModelError(said or f"--vae {spec}: not a loadable AutoencoderKL folder or hub id ({first})") from None


def _check_parts(folder: Path, spec: str, parts: tuple[str, ...]) -> None:
    """Every part the pipeline needs has its subfolder. Checked up front: transformers 5 quietly builds an empty
    tokenizer when tokenizer/ is gone, which fails only later, deep inside generation."""
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise ModelError(f"--model {spec}: the model folder lacks {', '.join(p + '/' for p in missing)} "
                         "(copy the whole diffusers folder)")


def _check_pickles(folder: Path, spec: str, flag: str = "--model") -> None:
    """A part stored only as a pickle is refused up front, by name, unless --allow-pickle."""
    found = pickled_only(folder)
    if found and not pickle_allowed():
        raise ModelError(f"{flag} {spec} ({found[0].relative_to(folder)}): {REFUSAL}")


def _safetensors() -> bool | None:
    """diffusers' use_safetensors: only safetensors, unless pickles are allowed (then either; weights-only)."""
    return None if pickle_allowed() else True


def _load_pipeline(spec: str, *, model_config: str | None, revision: str | None,
                   dtype: torch.dtype | dict[str, torch.dtype]):
    from .families import SD, family_of, family_of_folder, family_of_single_file

    path = Path(spec)
    if spec in BUILT_IN or path.is_dir():
        if spec not in BUILT_IN and not (path / "model_index.json").is_file():
            raise ModelError(f"--model {spec}: folder has no model_index.json (not a diffusers model folder)")
        family = family_of_folder(model_path(spec))
        parts = ("unet", "vae", "scheduler") + family.text_encoders + family.tokenizers
        _check_parts(Path(model_path(spec)), spec, parts)
        _check_pickles(Path(model_path(spec)), spec)
        try:
            return family.pipeline().from_pretrained(model_path(spec), dtype=dtype, use_safetensors=_safetensors(),
                                                     **family.pipeline_kwargs)
        # diffusers' and transformers' ways of saying a part is damaged (weights, config.json, a missing file)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            first = first_line(exc)
            raise ModelError(f"--model {spec}: cannot load the model folder ({first})") from None
    if path.suffix == ".safetensors" or is_pickle(path):
        if not path.is_file():
            raise ModelError(f"--model {spec}: file not found")
        refuse_pickle("--model", spec, ModelError)
        path = as_safetensors(path, "--model")
        if model_config is not None and not Path(model_config, "model_index.json").is_file():
            raise ModelError(f"--model-config {model_config}: not a diffusers folder (no model_index.json)")
        try:
            family = family_of_folder(model_config) if model_config else family_of_single_file(path)
            pipe = family.pipeline().from_single_file(  # it takes one dtype: per component below
                str(path), config=model_config, local_files_only=model_config is not None,
                dtype=torch.float32 if isinstance(dtype, dict) else dtype, **family.pipeline_kwargs)
        except ModelError:
            raise
        except Exception as exc:  # diffusers and safetensors raise many types; all mean the same to the user
            hint = "" if model_config else " (offline, pass --model-config <local diffusers folder>)"
            raise ModelError(f"--model {spec}: cannot load single-file checkpoint{hint}: "
                             f"{first_line(exc)}") from None
        if isinstance(dtype, dict):
            for name, part in pipe.components.items():
                if isinstance(part, torch.nn.Module):
                    part.to(component_dtype(dtype, name))
        return pipe
    if path.is_file():
        raise ModelError(f"--model {spec}: not a diffusers model folder or a .safetensors checkpoint")
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise ModelError(f"--model {spec}: no such file or folder")
    try:
        from diffusers import DiffusionPipeline

        # diffusers picks the pipeline class from the repo's model_index.json; SD's safety checker is not
        # loaded (other families ignore the two arguments)
        pipe = DiffusionPipeline.from_pretrained(spec, revision=revision, dtype=dtype, use_safetensors=_safetensors(),
                                                 **SD.pipeline_kwargs)
    except Exception as exc:  # hub errors come in many types: a missing or removed repository is said as such
        log.debug("hub load of %s failed: %s", spec, exc)
        raise ModelError(hub_error("--model", spec, exc, LOCAL_OR_BUILT_IN) or
                         f"--model {spec}: not a local path and not loadable from the model hub ({first_line(exc)}); "
                         f"{LOCAL_OR_BUILT_IN}") from None
    family_of(pipe)  # another kind of pipeline (SD3, Flux, ...) is refused by name
    return pipe


def native_resolution(pipe) -> int:
    """The image size the model was trained at (unet sample size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
