"""Model loading: the built-in models by name (boothkit.models.tiny, .mini, .shapes), local diffusers folders,
single-file checkpoints and hub ids, each as its family's pipeline (boothkit.models.families)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..core.errors import ConfigError, ModelError, first_line
from ..core.files import boothkit_home
from ..core.hub_ids import LOCAL_OR_BUILT_IN, hub_error
from ..core.safety import REFUSAL, as_safetensors, is_pickle, pickle_allowed, pickled_only, refuse_pickle
from .families import family_of, family_of_folder, family_of_index, family_of_single_file
from .mini import MINI, mini_path
from .mini_flow import MARKER as MINI_FLOW_MARKER
from .mini_flow import MINI_FLOW, mini_flow_path
from .quantize import pipeline_quantization, quiet
from .shapes import SD15_SHAPE, sd15_shape_path
from .tiny import TINY, TINY_VERSION, TINY_XL, TINY_XL_VERSION, tiny_model_path, tiny_xl_model_path
from .tiny_flow import TINY_FLUX, TINY_FLUX_VERSION, TINY_SD3, TINY_SD3_VERSION, tiny_flux_model_path, tiny_sd3_model_path

log = logging.getLogger("boothkit")

# built-in name -> (the function that builds it on first use and returns its folder, its cache version or None)
_BUILT = {TINY: (tiny_model_path, TINY_VERSION), TINY_XL: (tiny_xl_model_path, TINY_XL_VERSION),
          TINY_SD3: (tiny_sd3_model_path, TINY_SD3_VERSION), TINY_FLUX: (tiny_flux_model_path, TINY_FLUX_VERSION),
          MINI: (lambda: mini_path("model"), None), MINI_FLOW: (mini_flow_path, None),
          SD15_SHAPE: (sd15_shape_path, None)}
BUILT_IN = tuple(_BUILT)
TINIES = (TINY, TINY_XL, TINY_SD3, TINY_FLUX)
_PRETRAINED_MARKERS = {"BOOTHKIT_MINI.json": MINI, MINI_FLOW_MARKER: MINI_FLOW}  # their cached folders' markers


def model_ref(spec: str) -> str:
    """A stable name for a model, as metadata and manifests record it: 'tiny', 'mini'... for the built-in models
    (however they were named), an absolute path for local files and folders, the hub id otherwise."""
    if spec in BUILT_IN:
        return spec
    p = Path(spec).expanduser()
    if not p.exists():
        return spec
    p = p.resolve()
    for name, (_, version) in _BUILT.items():
        if version and p == (boothkit_home() / "models" / version).resolve():
            return name
    if p.parent == (boothkit_home() / "models").resolve():
        for marker, name in _PRETRAINED_MARKERS.items():
            if (p / marker).is_file():
                return name
    return str(p)


def architecture_digest(spec: str, part: str, revision: str | None = None) -> str:
    """A short hash of `part`'s config.json where it is on disk without downloading (a built-in, a local folder, a
    hub repository's cache); '' where it is not (a single file, an uncached hub id). What timings are cached under:
    the same name with another architecture is another model."""
    path = Path(model_path(spec), part, "config.json")
    if not path.is_file() and not Path(spec).exists() and spec.count("/") == 1:  # a hub id: its cached copy
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, f"{part}/config.json", revision=revision)
        path = Path(cached) if isinstance(cached, str) else path
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def model_name(model: str, vae: str | None = None) -> str:
    """model_ref, with the replacement VAE when there is one (class images made with it are other pictures)."""
    return f"{model_ref(model)} + vae {model_ref(vae)}" if vae else model_ref(model)


def is_tiny(spec: str) -> bool:
    return spec in TINIES or Path(spec, "BOOTHKIT_TINY.json").is_file()


# ----------------------------------------------------------------------------------------------- loading

def model_path(spec: str) -> str:
    """What `spec` names, for from_pretrained: built-in names become their cached folders; others pass through."""
    return str(_BUILT[spec][0]()) if spec in _BUILT else spec


def family_of_spec(spec: str, model_config: str | None = None, revision: str | None = None):
    """The family of --model without loading its weights or asking the hub: a built-in's or folder's
    model_index.json, a single file's keys, a hub repository's cached model_index.json; None where only loading
    can tell (an uncached hub id: its family is checked once it is downloaded, before its weights load)."""
    path = Path(spec)
    if spec in BUILT_IN or (path / "model_index.json").is_file():
        return family_of_folder(model_path(spec))
    if model_config and Path(model_config, "model_index.json").is_file():
        return family_of_folder(model_config)
    if path.is_file() and path.suffix == ".safetensors":
        return family_of_single_file(path)
    if not path.exists() and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:  # a hub id
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "model_index.json", revision=revision)
        return family_of_index(json.loads(Path(cached).read_text()), spec) if isinstance(cached, str) else None
    return None





def load_pipeline(spec: str, *, model_config: str | None = None, revision: str | None = None,
                  dtype: torch.dtype | dict[str, torch.dtype] = torch.float32, vae: str | None = None,
                  quantize: str | None = None):
    """Load an SD 1.x/2.x or SDXL pipeline (its family's class) from a built-in name, a local folder, a single
    .safetensors file or a hub id; `vae` replaces its VAE. `dtype`: one for all components, or one per component
    as diffusers takes it ({"default": torch.bfloat16, "vae": torch.float32}): each is loaded straight into its
    dtype, so no full-precision copy of the model is ever held. `quantize` (--quantize-base): the family's frozen
    transformer and T5 load quantized (models.quantize)."""
    other = load_vae(vae, component_dtype(dtype, "vae")) if vae else None  # a wrong --vae fails before the slow load
    pipe = _load_pipeline(spec, model_config=model_config, revision=revision, dtype=dtype, quantize=quantize)
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


def _recorded(folder: Path, key: str) -> float | None:
    """What a built-in model's marker (BOOTHKIT_TINY.json, BOOTHKIT_MINI_FLOW.json) or a boothkit full fine-tune
    (boothkit.json) records of itself: the size it is made for (a transformer's config does not say it, and
    FluxPipeline would otherwise draw at 1024 px) and the guidance it draws with."""
    for name in ("BOOTHKIT_TINY.json", "BOOTHKIT_MINI_FLOW.json", "boothkit.json"):
        try:
            return float(json.loads((folder / name).read_text()).get(key) or 0) or None
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return None


def _safetensors() -> bool | None:
    """diffusers' use_safetensors: only safetensors, unless pickles are allowed (then either; weights-only)."""
    return None if pickle_allowed() else True


def _load_pipeline(spec: str, *, model_config: str | None, revision: str | None,
                   dtype: torch.dtype | dict[str, torch.dtype], quantize: str | None = None):
    path = Path(spec)
    if spec in BUILT_IN or path.is_dir():
        if spec not in BUILT_IN and not (path / "model_index.json").is_file():
            raise ModelError(f"--model {spec}: folder has no model_index.json (not a diffusers model folder)")
        folder = Path(model_path(spec))
        family = family_of_folder(folder)
        parts = (family.denoiser, "vae", "scheduler") + family.text_encoders + family.tokenizers
        _check_parts(folder, spec, parts)
        _check_pickles(folder, spec)
        more = {"quantization_config": pipeline_quantization(quantize, family)} if quantize else {}
        try:
            with quiet():
                pipe = family.pipeline().from_pretrained(str(folder), dtype=dtype, use_safetensors=_safetensors(),
                                                         **family.pipeline_kwargs, **more)
        # diffusers' and transformers' ways of saying a part is damaged (weights, config.json, a missing file)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            first = first_line(exc)
            raise ModelError(f"--model {spec}: cannot load the model folder ({first})") from None
        resolution = _recorded(folder, "resolution")
        pipe.boothkit_resolution = int(resolution) if resolution else None
        pipe.boothkit_guidance = _recorded(folder, "guidance")
        return pipe
    if path.suffix == ".safetensors" or is_pickle(path):
        if not path.is_file():
            raise ModelError(f"--model {spec}: file not found")
        if quantize:
            raise ModelError(f"--quantize-base {quantize}: quantizes a diffusers folder or hub model as it loads; "
                             f"convert {spec} to a diffusers folder first")
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

        # the download (what from_pretrained does first: it fails at once when the hub cannot be asked), then the
        # folder's model_index.json names the family, which loads it with its own arguments (SD: no safety
        # checker; --quantize-base) and refuses a pipeline boothkit does not train before its weights load
        folder = DiffusionPipeline.download(spec, revision=revision, use_safetensors=_safetensors())
        family = family_of_index(json.loads((Path(folder) / "model_index.json").read_text()), spec)
        more = {"quantization_config": pipeline_quantization(quantize, family)} if quantize else {}
        with quiet():
            pipe = family.pipeline().from_pretrained(folder, dtype=dtype, use_safetensors=_safetensors(),
                                                     **family.pipeline_kwargs, **more)
    except (ModelError, ConfigError):
        raise
    except Exception as exc:  # hub errors come in many types: a missing or removed repository is said as such
        log.debug("hub load of %s failed: %s", spec, exc)
        raise ModelError(hub_error("--model", spec, exc, LOCAL_OR_BUILT_IN) or
                         f"--model {spec}: not a local path and not loadable from the model hub ({first_line(exc)}); "
                         f"{LOCAL_OR_BUILT_IN}") from None
    return pipe


def native_resolution(pipe) -> int:
    """The image size the model was trained at (its family knows where the model says it)."""
    return family_of(pipe).native_resolution(pipe)
