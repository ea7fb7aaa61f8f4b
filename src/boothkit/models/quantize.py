"""--quantize-base: the frozen transformer and T5 of a flow-matching model loaded quantized, through diffusers'
`PipelineQuantizationConfig` (torchao or bitsandbytes, per component), so that no full-precision copy is ever held;
LoRA then trains on top in fp32 (peft's torchao / bitsandbytes LoRA layers). What each kind needs is checked before
anything loads, and said in one line when the machine lacks it.

- int8: torchao int8 weight-only (`Int8WeightOnlyConfig`): half of bf16's bytes; runs on CPU and GPU.
- nf4:  bitsandbytes 4-bit NormalFloat (QLoRA), bf16 compute: a quarter of bf16's bytes; CUDA only.
- fp8:  torchao float8 weight-only (`Float8WeightOnlyConfig`): CUDA GPUs with compute capability 8.9 or newer.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from ..core.errors import ConfigError
from ..core.quiet import quieted
from .families import Family

FLAG = "model.quantize_base (--quantize-base)"


def check_quantize(kind: str, family: Family) -> None:
    """Refuse a kind this family or machine cannot run, naming what is missing."""
    if not family.quantizable:
        raise ConfigError(f"{FLAG} {kind}: quantizes the frozen transformer and T5 of SD3/3.5 and FLUX.1 models; "
                          f"{family.label} models train in bf16 or fp32")
    needs = {"int8": ("torchao", False), "nf4": ("bitsandbytes", True), "fp8": ("torchao", True)}[kind]
    if importlib.util.find_spec(needs[0]) is None:
        raise ConfigError(f"{FLAG} {kind}: needs {needs[0]} (pip install {needs[0]})")
    if needs[1] and not torch.cuda.is_available():
        raise ConfigError(f"{FLAG} {kind}: needs a CUDA GPU; on a CPU use int8")
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(f"{FLAG} fp8: needs a GPU of compute capability 8.9 or newer (Ada, Hopper); use int8 "
                          f"or nf4")


def quiet():
    """torchao logs the GPU kernels it cannot load on a CPU machine, torch's pytree that torchao registers enums it
    no longer needs to, and peft warns that a LoRA on a quantized layer cannot be merged into it (boothkit never
    merges into a quantized base): all noise here."""
    return quieted(("torchao", "torch.utils._pytree"), logging.ERROR, (".*get_apply_tensor_subclass",))


def pipeline_quantization(kind: str, family: Family):
    """diffusers' PipelineQuantizationConfig quantizing the family's frozen parts (`Family.quantizable`)."""
    check_quantize(kind, family)
    with quiet():
        from diffusers.quantizers import PipelineQuantizationConfig

        if kind == "nf4":
            import diffusers
            import transformers

            args = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            configs = (diffusers.BitsAndBytesConfig(**args), transformers.BitsAndBytesConfig(**args))
        else:
            import diffusers
            import transformers
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

            quant = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
            configs = (diffusers.TorchAoConfig(quant), transformers.TorchAoConfig(quant))
    # the transformer is a diffusers model, T5 a transformers one: each library's own config
    mapping = {part: configs[0] if part == family.denoiser else configs[1] for part in family.quantizable}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def is_quantized(model: torch.nn.Module) -> bool:
    """Loaded quantized: such a model keeps its weights' storage (no .to(dtype), which both libraries refuse)."""
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False) is True
