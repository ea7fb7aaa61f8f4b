"""Loading a LoRA file into a pipeline: diffusers' loader for LoRA and DoRA files, peft's injection for LoKr/LoHa,
each failure one line naming the file."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from ..core.errors import BoothkitError, first_line
from ..core.quiet import quieted
from ..models.families import FAMILIES, by_name, family_of
from .inject import ADAPTER_PREFIX, LYCORIS, lora_config
from .lora import lora_header, lycoris_config


def _quiet_lora_load():
    # diffusers logs a failed load at ERROR level with the whole multi-line state-dict report before raising;
    # the raised error is reported on one line instead. transformers 5 logs a "MISSING ... newly initialized"
    # table whenever a LoRA goes into a text encoder: it lists the frozen base weights, which are untouched.
    # peft warns "multiple adapters" for every LoRA after the first: that is what --lora A --lora B asks for.
    return quieted(("diffusers.loaders.peft", "transformers.utils.loading_report"), logging.CRITICAL,
                   ("Already found a `peft_config` attribute",))


def _misfit(exc: BaseException, model: str) -> str:
    text = str(exc)
    if "size mismatch" in text:
        return f"its layer shapes do not fit {model} (a LoRA for another model family or size?)"
    if "not found in the base model" in text:  # peft's words when no target module exists (diffusers raises them)
        return f"none of its layers matches {model} (LoRA for another model?)"
    return f"cannot be applied to {model} ({first_line(exc)})"


def apply_lora(pipe, path: str | Path, given: str, adapter_name: str, model: str) -> None:
    """pipe.load_lora_weights with a one-line error naming the LoRA when it is damaged or made for another model.

    `given` is the --lora value as the user wrote it; `model` names the base model in messages."""
    from safetensors import SafetensorError

    file, meta, _ = lora_header(path)
    made_for, family = meta.get("boothkit.family"), family_of(pipe)
    if made_for and made_for != family.name:
        label = by_name(made_for).label if made_for in {f.name for f in FAMILIES.values()} else made_for
        raise BoothkitError(f"--lora {given}: made for {label} models, but {model} is {family.label} (a LoRA "
                            f"from another model family)")
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


def _apply_lycoris(pipe, file: Path, meta: Mapping[str, str], given: str, adapter_name: str, model: str) -> None:
    """Load a boothkit LoKr/LoHa file: diffusers' load_lora_weights reads no peft LoKr/LoHa, so inject peft's
    adapter into each component and load its weights. Marked as diffusers' own PEFT adapters, so set_adapters
    (the --unet-scale / --text-encoder-scale path) scales them through peft's set_scale."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    kind, configs = meta["boothkit.adapter"], lycoris_config(file, meta, given)
    denoiser = family_of(pipe).denoiser
    tensors = load_file(str(file))
    for comp, c in configs.items():
        module = getattr(pipe, comp, None)
        sd = {k[len(comp) + 1:]: v for k, v in tensors.items() if k.startswith(comp + ".")}
        if module is None or not sd:
            raise BoothkitError(f"--lora {given}: has {comp} weights, but {model} has no {comp}")
        if comp != denoiser and not hasattr(module, "text_model"):  # transformers 5 (see canonical_text_encoder_keys)
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        try:
            with _quiet_lora_load():
                inject_adapter_in_model(lora_config(c["target_modules"], int(c["r"]), float(c["alpha"]), kind=kind,
                                                    exclude=c.get("exclude_modules")),
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
        if comp == denoiser:
            module._hf_peft_config_loaded = True  # what diffusers' set_adapters checks on a UNet or transformer
