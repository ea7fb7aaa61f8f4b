"""LoRA adapters through peft, and the diffusers-format LoRA file boothkit writes and reads.

The file is what diffusers' own training scripts produce: PEFT keys prefixed by component
(``unet.<module>.lora_A.weight`` / ``text_encoder.<module>.lora_B.weight``) with the adapter's LoraConfig
under the ``lora_adapter_metadata`` key, so plain ``pipe.load_lora_weights(folder)`` restores rank and alpha.
boothkit's own facts (base model, token, class noun, ...) sit beside it as ``boothkit.*`` string keys.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..core.errors import BoothkitError, first_line
from ..core.files import atomic_write_bytes
from ..core.safety import as_safetensors, is_pickle
from ..models.families import family_of

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_PICKLE = "pytorch_lora_weights.bin"  # what older diffusers scripts wrote
ADAPTER = "default"
# --adapter -> the prefix of its peft parameter names; lokr/loha files are not diffusers LoRA files (see apply_lora)
ADAPTER_PREFIX = {"lora": "lora_", "dora": "lora_", "lokr": "lokr_", "loha": "hada_"}
LYCORIS = ("lokr", "loha")


def lora_config(targets, rank: int, alpha: float, dropout: float = 0.0, kind: str = "lora"):
    """peft config of adapter `kind` for `targets` (module-name suffixes such as 'to_q' or 'to_out.0')."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind in LYCORIS:  # peft's LyCORIS configs: same rank/alpha meaning (scale alpha / r)
        cls = LoKrConfig if kind == "lokr" else LoHaConfig
        return cls(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=list(targets), init_weights=True)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      init_lora_weights=True, use_dora=kind == "dora")


def add_lora(model: torch.nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0,
             kind: str = "lora") -> torch.nn.Module:
    """Inject a trainable adapter (its update starts at 0, so the model starts unchanged); freeze everything else."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(targets, rank, alpha, dropout, kind), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(f".{ADAPTER_PREFIX[kind]}" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise BoothkitError(f"no module of {type(model).__name__} matches the LoRA targets {', '.join(targets)}")
    return model


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """Run `models` as their frozen base (every peft LoRA layer bypassed), then switch the adapters back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT key names (adapter name removed)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def canonical_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name text-encoder LoRA weights as CLIPTextModel's checkpoints do (``text_model.encoder...``).

    transformers 5 dropped the ``text_model.`` level from CLIPTextModel's module tree but still reads it;
    LoRA files everywhere else (diffusers with transformers 4, A1111/kohya converters) expect it.
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def adapter_metadata(targets, rank: int, alpha: float, kind: str = "lora") -> dict:
    """The LoraConfig fields diffusers reads back from ``lora_adapter_metadata`` (for lokr/loha: the
    LoKrConfig/LoHaConfig fields boothkit reads back from ``boothkit.adapter_config``)."""
    if kind in LYCORIS:
        return {"r": rank, "alpha": alpha, "target_modules": sorted(targets)}
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0,
            "init_lora_weights": True, "use_dora": kind == "dora", "lora_bias": False}


def save_lora_file(path: str | Path, layers: Mapping[str, Mapping[str, torch.Tensor]],
                   adapters: Mapping[str, dict], info: Mapping[str, str], kind: str = "lora") -> Path:
    """Write a diffusers-format LoRA .safetensors atomically.

    layers:   component ('unet' / 'text_encoder') -> PEFT state dict
    adapters: component -> adapter_metadata(...)
    info:     boothkit facts, stored as ``boothkit.<key>`` string metadata
    """
    from safetensors.torch import save

    tensors = {f"{comp}.{k}": v.detach().to("cpu").contiguous() for comp, sd in layers.items() for k, v in sd.items()}
    packed = {f"{comp}.{k}": v for comp, meta in adapters.items() for k, v in meta.items()}
    # diffusers must not read a LoKr/LoHa config as a LoraConfig: it cannot load those files anyway
    config_key = "boothkit.adapter_config" if kind in LYCORIS else "lora_adapter_metadata"
    metadata = {"format": "pt", config_key: json.dumps(packed, indent=2, sort_keys=True)}
    metadata.update({f"boothkit.{k}": str(v) for k, v in info.items()})
    metadata["boothkit.adapter"] = kind
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def lora_file(path: str | Path) -> Path:
    """Resolve a boothkit output folder or a .safetensors file to the LoRA file it names."""
    p = Path(path)
    if p.is_dir():
        pickled = p / LORA_PICKLE
        p = pickled if not (p / LORA_FILE).is_file() and pickled.is_file() else p / LORA_FILE
    if not p.is_file():
        raise BoothkitError(f"--lora {path}: no LoRA file found (expected a folder with {LORA_FILE} or a .safetensors file)")
    if is_pickle(p):
        return as_safetensors(p, "--lora")  # refused unless --allow-pickle; then a weights-only converted copy
    if p.suffix != ".safetensors":
        raise BoothkitError(f"--lora {path}: not a .safetensors LoRA file")
    return p


def lora_header(path: str | Path) -> tuple[Path, dict[str, str], list[str]]:
    """The LoRA file `path` names, its metadata and tensor names, read without loading weights. A damaged file,
    another kind of file or a safetensors file without LoRA weights is a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), "pt") as fh:
            meta, keys = dict(fh.metadata() or {}), list(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise BoothkitError(f"--lora {path}: not a LoRA safetensors file ({first_line(exc)})") from None
    # diffusers' own test of a LoRA checkpoint is that its names say 'lora' (PEFT, kohya, ComfyUI and LyCORIS do);
    # boothkit's LoKr/LoHa files carry peft's lokr_/hada_ names
    if not keys or not any(t in k for k in keys for t in ("lora", ".lokr_", ".hada_")):
        first = f"first tensor '{keys[0]}'" if keys else "no tensors"
        raise BoothkitError(f"--lora {path}: not a LoRA safetensors file ({first}; LoRA weights are named *lora*)")
    return file, meta, keys


def read_lora_info(path: str | Path) -> dict[str, str]:
    """boothkit.* metadata of a LoRA file (empty for files made by other trainers)."""
    meta = lora_header(path)[1]
    return {k[len("boothkit."):]: v for k, v in meta.items() if k.startswith("boothkit.")}


@contextlib.contextmanager
def _quiet_lora_load() -> Iterator[None]:
    # diffusers logs a failed load at ERROR level with the whole multi-line state-dict report before raising;
    # the raised error is reported on one line instead. transformers 5 logs a "MISSING ... newly initialized"
    # table whenever a LoRA goes into a text encoder: it lists the frozen base weights, which are untouched.
    # peft warns "multiple adapters" for every LoRA after the first: that is what --lora A --lora B asks for.
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.peft", "transformers.utils.loading_report")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _misfit(exc: BaseException, model: str) -> str:
    text = str(exc)
    if "size mismatch" in text:
        return f"its layer shapes do not fit {model} (a LoRA for another model family or size?)"
    return f"cannot be applied to {model} ({first_line(exc)})"


def apply_lora(pipe, path: str | Path, given: str, adapter_name: str, model: str) -> None:
    """pipe.load_lora_weights with a one-line error naming the LoRA when it is damaged or made for another model.

    `given` is the --lora value as the user wrote it; `model` names the base model in messages."""
    from safetensors import SafetensorError


    file, meta, _ = lora_header(path)
    made_for, family = meta.get("boothkit.family"), family_of(pipe).name
    if made_for and made_for != family:
        names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
        raise BoothkitError(f"--lora {given}: made for {names.get(made_for, made_for)} models, but {model} is "
                            f"{names.get(family, family)} (a LoRA from another model family)")
    if meta.get("boothkit.adapter") in LYCORIS:
        return _apply_lycoris(pipe, file, meta, given, adapter_name, model)
    try:
        with _quiet_lora_load():
            pipe.load_lora_weights(str(file), adapter_name=adapter_name)
    # diffusers' and safetensors' ways of saying "damaged" or "does not fit"
    except (ValueError, RuntimeError, KeyError, TypeError, OSError, SafetensorError) as exc:
        raise BoothkitError(f"--lora {given}: {_misfit(exc, model)}") from None
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        raise BoothkitError(f"--lora {given}: none of its layers matches {model} (LoRA for another model?)")


def lycoris_config(file: Path, meta: Mapping[str, str], given: str) -> dict:
    """``boothkit.adapter_config`` of a LoKr/LoHa file: component -> {r, alpha, target_modules}."""
    try:
        packed = json.loads(meta["boothkit.adapter_config"])
        out: dict[str, dict] = {}
        for key, value in packed.items():
            comp, _, field = key.partition(".")
            out.setdefault(comp, {})[field] = value
        return out
    except (KeyError, ValueError, AttributeError):
        raise BoothkitError(f"--lora {given}: its boothkit.adapter_config metadata is missing or damaged") from None


def _apply_lycoris(pipe, file: Path, meta: Mapping[str, str], given: str, adapter_name: str, model: str) -> None:
    """Load a boothkit LoKr/LoHa file: diffusers' load_lora_weights reads no peft LoKr/LoHa, so inject peft's
    adapter into each component and load its weights. Marked as diffusers' own PEFT adapters, so set_adapters
    (the --unet-scale / --text-encoder-scale path) scales them through peft's set_scale."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    kind, configs = meta["boothkit.adapter"], lycoris_config(file, meta, given)
    tensors = load_file(str(file))
    for comp, c in configs.items():
        module = getattr(pipe, comp, None)
        sd = {k[len(comp) + 1:]: v for k, v in tensors.items() if k.startswith(comp + ".")}
        if module is None or not sd:
            raise BoothkitError(f"--lora {given}: has {comp} weights, but {model} has no {comp}")
        if comp != "unet" and not hasattr(module, "text_model"):  # transformers 5 (see canonical_text_encoder_keys)
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        try:
            with _quiet_lora_load():
                inject_adapter_in_model(lora_config(c["target_modules"], int(c["r"]), float(c["alpha"]), kind=kind),
                                        module, adapter_name=adapter_name)
                result = set_peft_model_state_dict(module, sd, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise BoothkitError(f"--lora {given}: {_misfit(exc, model)}") from None
        if result.unexpected_keys:
            raise BoothkitError(f"--lora {given}: {len(result.unexpected_keys)} {comp} weights match no layer of "
                                f"{model} (first: {result.unexpected_keys[0]})")
        for name, param in module.named_parameters():  # the new adapter weights in the pipeline's precision
            if f".{ADAPTER_PREFIX[kind]}" in name:
                param.data = param.data.to(module.dtype)
        module.requires_grad_(False)
        if comp == "unet":
            module._hf_peft_config_loaded = True  # what diffusers' UNet.set_adapters checks
