"""How other tools name what boothkit's modules are called: diffusers UNet/VAE/CLIP module paths in the original
(ldm) Stable Diffusion layout, open_clip's text encoder names, the kohya/A1111 and ComfyUI LoRA key names, and the
names kohya and ComfyUI give Flux.1 / SD3 LoRAs (the BFL and MMDiT module paths). Pure tables and functions: the
writers are in boothkit.export.formats and export.flow (see formats' docstring for the formats)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

from ..core.errors import BoothkitError, ModelError

# torch, and the model families (which load it), are imported where they are used: the CLI imports the export wing
# for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).
if TYPE_CHECKING:
    import torch

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # SD 1.x/2.x; SDXL's are in boothkit.models.families


def te_original_name(module: str) -> str:
    """transformers-5 CLIPTextModel module path -> the transformers-4 / original SD one (``text_model.`` prefix)."""
    return module if module.startswith("text_model.") else "text_model." + module


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                    # SDXL's size/pooled-text embedding
                    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return ".".join(x for x in (_RESNET_TO_LDM.get(head, head), rest) if x)


def unet_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """A diffusers UNet2DConditionModel module/parameter path -> its path in the original SD (ldm) UNet.

    Inverse of diffusers' ``convert_ldm_unet_checkpoint``: input block i holds down block (i-1)//(L+1), layer
    (i-1)%(L+1) as [resnet, attention] or, at layer L, the downsampler; output block i holds up block i//(L+1),
    layer i%(L+1) as [resnet, attention?, upsampler?]; the middle block is [resnet, attention, resnet].
    """
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ModelError("single-file export needs one layers_per_block for all UNet blocks (SD 1.x/2.x layout)")
    for src, dst in _UNET_TOP_TO_LDM.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
                 r"(?:\.(.*))?$", key)
    if m:
        kind, block, part, layer, tail = m[1], int(m[2]), m[3], int(m[4]), m[5] or ""
        if kind == "down_blocks":
            if part == "downsamplers":
                # diffusers' Downsample2D keeps its conv as `.conv`; ldm's calls it `.op`
                return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op" + tail[len("conv"):]
            i = 1 + block * (lpb + 1) + layer
        else:
            if part == "upsamplers":
                has_attn = str(config["up_block_types"][block]).startswith("CrossAttn")
                return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if has_attn else 1}.{tail}".rstrip(".")
            i = block * (lpb + 1) + layer
        base = f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{i}"
        if part == "resnets":
            return f"{base}.0.{_resnet_tail(tail)}".rstrip(".")
        return f"{base}.1.{tail}".rstrip(".")
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", key)
    if m:
        j, tail = int(m[2]), m[3] or ""
        if m[1] == "resnets":
            return f"middle_block.{2 * j}.{_resnet_tail(tail)}".rstrip(".")
        return f"middle_block.{2 * j + 1}.{tail}".rstrip(".")
    raise ModelError(f"UNet parameter '{key}' has no place in the SD 1.x/2.x checkpoint layout")


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP_TO_LDM = {"conv_norm_out": "norm_out"}


def vae_to_ldm(key: str, num_blocks: int) -> str:
    """A diffusers AutoencoderKL parameter path -> the original SD VAE's (inverse of ``convert_ldm_vae_checkpoint``)."""
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if m is None:
        return key  # quant_conv / post_quant_conv keep their names
    side, rest = m[1], m[2]
    if m2 := re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", rest):
        block = int(m2[2])
        ldm_block = f"down.{block}" if m2[1] == "down_blocks" else f"up.{num_blocks - 1 - block}"
        if m2[3] == "resnets":
            return f"{side}.{ldm_block}.block.{m2[4]}.{m2[5].replace('conv_shortcut', 'nin_shortcut')}"
        return f"{side}.{ldm_block}.{'downsample' if m2[3] == 'downsamplers' else 'upsample'}.{m2[5]}"
    if m2 := re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", rest):
        return f"{side}.mid.block_{int(m2[1]) + 1}.{m2[2].replace('conv_shortcut', 'nin_shortcut')}"
    if m2 := re.match(r"^mid_block\.attentions\.0\.(.*)\.(weight|bias)$", rest):
        if m2[1] not in _VAE_ATTN_TO_LDM:
            raise ModelError(f"VAE parameter '{key}' has no place in the SD checkpoint layout")
        return f"{side}.mid.attn_1.{_VAE_ATTN_TO_LDM[m2[1]]}.{m2[2]}"
    head, _, tail = rest.partition(".")
    return f"{side}.{_VAE_TOP_TO_LDM.get(head, head)}.{tail}"


def ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The models' weights in the original single-file layout: SD 1.x (ldm), or SDXL (sgm: CLIP-L under
    conditioner.embedders.0, the OpenCLIP-style second encoder under conditioner.embedders.1)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + unet_to_ldm(k, unet.config)] = v
    n = len(vae.config.down_block_types)
    for k, v in vae.state_dict().items():
        name = "first_stage_model." + vae_to_ldm(k, n)
        # ldm's VAE attention projections are 1x1 convolutions; diffusers' are Linear
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2 and ".norm." not in name:
            v = v[:, :, None, None]
        out[name] = v
    first = "cond_stage_model.transformer." if text_encoder_2 is None else "conditioner.embedders.0.transformer."
    for k, v in text_encoder.state_dict().items():
        if not k.endswith("position_ids"):
            out[first + te_original_name(k)] = v
    if text_encoder_2 is not None:
        out.update(open_clip_state_dict(text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return out


_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_state_dict(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (inverse of diffusers'
    ``convert_open_clip_checkpoint``): q/k/v stacked into in_proj, the projection transposed."""
    import torch

    state = {te_original_name(k) if not k.startswith("text_projection") else k: v for k, v in state.items()
             if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k):
            block, module, kind = m.groups()
            base = f"{prefix}transformer.resblocks.{block}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                layers.setdefault(f"{base}attn.in_proj_{kind}", {})[module[-6]] = v
            elif module in _OPEN_CLIP_LAYER:
                out[f"{base}{_OPEN_CLIP_LAYER[module]}.{kind}"] = v
            else:
                raise ModelError(f"text encoder 2 parameter '{k}' has no place in the OpenCLIP layout")
        else:
            raise ModelError(f"text encoder 2 parameter '{k}' has no place in the OpenCLIP layout")
    for name, qkv in layers.items():
        out[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def kohya_name(component: str, module: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """kohya/A1111 LoRA module name, dots as underscores: for SD 1.x/2.x the diffusers UNet path, for SDXL
    (a unet_config with text_time conditioning) the original (sgm) UNet path as sd-scripts writes it;
    text encoders by their transformers-4 CLIP path, SDXL's as lora_te1_ / lora_te2_."""
    from ..models.families import SD, SDXL

    xl = is_xl(unet_config)
    if component == "unet":
        return KOHYA_PREFIX["unet"] + (unet_to_ldm(module, unet_config) if xl else module).replace(".", "_")
    prefixes = (SDXL if xl else SD).kohya_prefixes
    if component not in prefixes:
        raise BoothkitError(f"a {component} LoRA does not fit an {'SDXL' if xl else 'SD 1.x/2.x'} base model")
    return prefixes[component] + te_original_name(module).replace(".", "_")


def is_xl(unet_config: Mapping[str, Any] | None) -> bool:
    return bool(unet_config) and unet_config.get("addition_embed_type") == "text_time"


def comfyui_name(component: str, module: str, unet_config: Mapping[str, Any]) -> str:
    """ComfyUI's LoRA key: the module's path in the original (ldm/sgm) UNet, or the kohya CLIP name."""
    if component == "unet":
        return KOHYA_PREFIX["unet"] + unet_to_ldm(module, unet_config).replace(".", "_")
    return kohya_name(component, module, unet_config)


# ------------------------------------------------------------------------------------ Flux.1 and SD3

# A diffusers transformer module -> (its module in the original (BFL / SAI MMDiT) model, which of the fused parts it
# is, the parts' relative widths). The original models fuse q, k and v (and, in Flux's single blocks, the MLP's input
# projection) into one Linear; kohya's sd-scripts and ComfyUI name LoRAs by those original modules.
_QKV, _LINEAR1 = (1, 1, 1), (1, 1, 1, 4)  # Flux single blocks: mlp_ratio 4, fixed in FluxTransformer2DModel
FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, _QKV), "attn.to_k": ("img_attn.qkv", 1, _QKV),
    "attn.to_v": ("img_attn.qkv", 2, _QKV), "attn.to_out.0": ("img_attn.proj", 0, (1,)),
    "attn.add_q_proj": ("txt_attn.qkv", 0, _QKV), "attn.add_k_proj": ("txt_attn.qkv", 1, _QKV),
    "attn.add_v_proj": ("txt_attn.qkv", 2, _QKV), "attn.to_add_out": ("txt_attn.proj", 0, (1,)),
    "ff.net.0.proj": ("img_mlp.0", 0, (1,)), "ff.net.2": ("img_mlp.2", 0, (1,)),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, (1,)), "ff_context.net.2": ("txt_mlp.2", 0, (1,)),
    "norm1.linear": ("img_mod.lin", 0, (1,)), "norm1_context.linear": ("txt_mod.lin", 0, (1,)),
}
FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, _LINEAR1), "attn.to_k": ("linear1", 1, _LINEAR1),
    "attn.to_v": ("linear1", 2, _LINEAR1), "proj_mlp": ("linear1", 3, _LINEAR1),
    "proj_out": ("linear2", 0, (1,)), "norm.linear": ("modulation.lin", 0, (1,)),
}
# SD3's last joint block is context-pre-only: it has no to_add_out / ff_context, and its norm1_context is
# scale/shift-swapped against the MMDiT's (diffusers' single-file converter swaps it), so it is left out
SD3_JOINT = {
    "attn.to_q": ("x_block.attn.qkv", 0, _QKV), "attn.to_k": ("x_block.attn.qkv", 1, _QKV),
    "attn.to_v": ("x_block.attn.qkv", 2, _QKV), "attn.to_out.0": ("x_block.attn.proj", 0, (1,)),
    "attn.add_q_proj": ("context_block.attn.qkv", 0, _QKV), "attn.add_k_proj": ("context_block.attn.qkv", 1, _QKV),
    "attn.add_v_proj": ("context_block.attn.qkv", 2, _QKV), "attn.to_add_out": ("context_block.attn.proj", 0, (1,)),
    "attn2.to_q": ("x_block.attn2.qkv", 0, _QKV), "attn2.to_k": ("x_block.attn2.qkv", 1, _QKV),  # SD3.5's
    "attn2.to_v": ("x_block.attn2.qkv", 2, _QKV), "attn2.to_out.0": ("x_block.attn2.proj", 0, (1,)),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0, (1,)), "ff.net.2": ("x_block.mlp.fc2", 0, (1,)),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0, (1,)), "ff_context.net.2": ("context_block.mlp.fc2", 0, (1,)),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0, (1,)),
}
FLOW_BLOCKS = {  # family -> diffusers block list -> (original block list, its module table)
    "flux": {"transformer_blocks": ("double_blocks", FLUX_DOUBLE), "single_transformer_blocks": ("single_blocks", FLUX_SINGLE)},
    "sd3": {"transformer_blocks": ("joint_blocks", SD3_JOINT)},
}
# text encoders: kohya's lora_te1 (CLIP-L), lora_te2 (SD3's CLIP-G); T5 is not exported (diffusers cannot read it back)
FLOW_TE_PREFIXES = {"flux": {"text_encoder": "lora_te1_"},
                    "sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}


def flow_name(family: str, component: str, module: str) -> tuple[str, int, tuple[int, ...]]:
    """A Flux.1 / SD3 LoRA module -> (kohya / ComfyUI module name, part index, the fused parts' relative widths).

    Transformer modules are named ``lora_unet_<original module path, '.' -> '_'>`` (sd-scripts' lora_flux /
    lora_sd3, which ComfyUI maps onto its own model: ``lora_unet_double_blocks_0_img_attn_qkv``,
    ``lora_unet_single_blocks_3_linear1``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``); CLIP text encoders
    by their transformers-4 path (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``)."""
    if component != "transformer":
        prefixes = FLOW_TE_PREFIXES[family]
        if component not in prefixes:
            raise BoothkitError(f"a {component} LoRA cannot be exported for {family} (exported: transformer, "
                                f"{', '.join(prefixes)})")
        return prefixes[component] + te_original_name(module).replace(".", "_"), 0, (1,)
    m = re.match(r"^([a-z_]+)\.(\d+)\.(.+)$", module)
    place = FLOW_BLOCKS[family].get(m[1]) if m else None
    if place is None or m[3] not in place[1]:
        raise BoothkitError(f"{family} transformer module '{module}' has no kohya/ComfyUI LoRA name (exported: the "
                            "blocks' attention, MLP and modulation linears)")
    original, part, widths = place[1][m[3]]
    return f"lora_unet_{place[0]}_{m[2]}_{original.replace('.', '_')}", part, widths
