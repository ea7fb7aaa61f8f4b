"""The published configs of the full-size flow-matching models (FLUX.1, SD3.5), as data, and those models on the
meta device: their real diffusers/transformers classes built without memory, for parameter counts and LoRA key lists.

Nothing here downloads: the hub repositories are gated, so each dict below is the text of the hub file named beside
it, copied by hand. Where it came from (every file is `<hub id>/<component>/config.json`; the hub itself could not
be read here, so each was checked against public copies of that file found by code search):

- FLUX.1-dev `transformer/config.json`: as quoted verbatim (with `"_name_or_path": "../checkpoints/flux-dev/
  transformer"`) in Ascend's ModelZoo FLUX.1-dev README, and in several model loaders (tenstorrent tt-forge-models'
  Flux loaders, model_unfolder's "Real FLUX.1-dev transformer/config.json values"). The file has no
  `axes_dims_rope` key: the class default (16, 56, 56) applies, as in every copy that lists it.
- FLUX.1-schnell `transformer/config.json`: the same file with `guidance_embeds: false` (schnell is not
  guidance-distilled: no guidance embedder).
- FLUX.1 `text_encoder/config.json` (CLIP ViT-L/14 text, `openai/clip-vit-large-patch14`) and
  `text_encoder_2/config.json` (T5 v1.1 XXL, `google/t5-v1_1-xxl`): model_unfolder's recorded configs and the
  mflux-style `load_t5` copy (d_model 4096, d_ff 10240, d_kv 64, 24 layers, 64 heads, vocab 32128, gated-gelu).
- FLUX.1 `vae/config.json`: AutoencoderKL, 16 latent channels, scaling 0.3611, shift 0.1159, no quant convs.
- stabilityai/stable-diffusion-3.5-large and -medium `transformer/config.json`: the Comfy-Org SD3.5 loaders in
  tt-forge-models and the recorded `sd35_tensor_index.json` that qds tests against (large: no
  `dual_attention_layers` key; medium: 0..12).
- SD3.5 `text_encoder` (CLIP-L with projection), `text_encoder_2` (OpenCLIP bigG/14 text with projection),
  `text_encoder_3` (the same T5 v1.1 XXL) and `vae/config.json` (scaling 1.5305, shift 0.0609).

Fields that only name versions or dtypes (`_diffusers_version`, `torch_dtype`, `transformers_version`) are kept as
the files give them where a copy showed them; they change no shape.
"""
from __future__ import annotations

import copy

from ..core.hub_ids import CLIP_L, FLUX1_DEV, FLUX1_SCHNELL
from ..core.hub_ids import SD35_LARGE as SD35_LARGE_ID
from ..core.hub_ids import SD35_MEDIUM as SD35_MEDIUM_ID

FLUX_DEV, FLUX_SCHNELL, SD35_MEDIUM, SD35_LARGE = FLUX1_DEV, FLUX1_SCHNELL, SD35_MEDIUM_ID, SD35_LARGE_ID

# boothkit's default LoRA targets on the transformer (peft target_modules suffixes). Flux's top-level
# `proj_out` (the final layer to the 64 packed latent channels) is excluded; the single blocks' `proj_out` is not.
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "proj_mlp", "proj_out")
FLUX_LORA_EXCLUDE = "^proj_out$"
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

_FLUX_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
_CLIP_L = {
    "_name_or_path": CLIP_L,
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "bfloat16",
    "vocab_size": 49408,
}
_T5_XXL = {
    "_name_or_path": "google/t5-v1_1-xxl",
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32128,
}
_OPENCLIP_BIGG = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}
_VAE16 = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
_SD3_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.31.0.dev0",
    "attention_head_dim": 64,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

CONFIGS: dict[str, dict[str, dict]] = {
    FLUX_DEV: {
        "transformer": _FLUX_TRANSFORMER,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _T5_XXL,
        "vae": _VAE16,
    },
    FLUX_SCHNELL: {
        "transformer": {**_FLUX_TRANSFORMER, "guidance_embeds": False},
        "text_encoder": _CLIP_L,
        "text_encoder_2": _T5_XXL,
        "vae": _VAE16,
    },
    SD35_MEDIUM: {
        "transformer": {**_SD3_TRANSFORMER, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
                        "num_attention_heads": 24, "num_layers": 24, "pos_embed_max_size": 384},
        "text_encoder": {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "torch_dtype": "float16"},
        "text_encoder_2": _OPENCLIP_BIGG,
        "text_encoder_3": {**_T5_XXL, "torch_dtype": "float16"},
        "vae": {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    },
    SD35_LARGE: {
        "transformer": {**_SD3_TRANSFORMER, "caption_projection_dim": 2432, "num_attention_heads": 38,
                        "num_layers": 38, "pos_embed_max_size": 192},
        "text_encoder": {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "torch_dtype": "float16"},
        "text_encoder_2": _OPENCLIP_BIGG,
        "text_encoder_3": {**_T5_XXL, "torch_dtype": "float16"},
        "vae": {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    },
}
# Text tokens the pipelines feed the transformer by default: Flux's T5 sequence (max_sequence_length 512 for dev,
# 256 for schnell; CLIP gives only the pooled vector); SD3's 77 CLIP tokens + 256 T5 tokens joined.
TEXT_TOKENS = {FLUX_DEV: 512, FLUX_SCHNELL: 256, SD35_MEDIUM: 77 + 256, SD35_LARGE: 77 + 256}


def config(hub_id: str, component: str) -> dict:
    """A copy of the published config of `component` ('transformer', 'text_encoder', ..., 'vae') of `hub_id`."""
    try:
        return copy.deepcopy(CONFIGS[hub_id][component])
    except KeyError:
        raise KeyError(f"no published config for {hub_id!r} / {component!r}; known: "
                       f"{ {k: sorted(v) for k, v in CONFIGS.items()} }") from None


def lora_targets(hub_id: str) -> tuple[tuple[str, ...], str | None]:
    """boothkit's default LoRA target suffixes of the transformer of `hub_id`, and the exclude regex (or None)."""
    if CONFIGS[hub_id]["transformer"]["_class_name"] == "FluxTransformer2DModel":
        return FLUX_LORA_TARGETS, FLUX_LORA_EXCLUDE
    return SD3_LORA_TARGETS, None


def meta_model(hub_id: str, component: str):
    """`component` of `hub_id` built from its published config with its real class, every tensor on the meta
    device (no memory, well under a second even for the 12 B Flux transformer)."""
    import diffusers
    import torch
    import transformers

    cfg = config(hub_id, component)
    # torch.device("meta") rather than accelerate's init_empty_weights: buffers too (SD3.5-medium's 384² x 1536
    # sin-cos position table would otherwise be computed for real: 0.9 GB and seconds).
    with torch.device("meta"):
        if "_class_name" in cfg:  # a diffusers model
            cls = getattr(diffusers, cfg.pop("_class_name"))
            return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        cls = getattr(transformers, cfg["architectures"][0])
        config_cls = transformers.T5Config if cfg["model_type"] == "t5" else transformers.CLIPTextConfig
        model = cls(config_cls(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
        if cfg["model_type"] == "t5":  # the checkpoint stores the token embedding once: `shared` is the encoder's
            model.encoder.embed_tokens = model.shared
        return model


def meta_lora_model(hub_id: str, rank: int = 16):
    """The meta-device transformer of `hub_id` with boothkit's default LoRA targets injected by peft (adapter
    'default'; its lora_A/lora_B weights on the meta device too)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = meta_model(hub_id, "transformer")
    targets, exclude = lora_targets(hub_id)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), exclude_modules=exclude)
    return inject_adapter_in_model(cfg, model, low_cpu_mem_usage=True)


def stored_count(model) -> int:
    """Elements of the tensors `model`'s checkpoint stores: parameters and persistent buffers, tied ones once.
    SD3's sin-cos position table is such a buffer (SD3.5-medium: 384² x 1536 = 226 M), and the published sizes
    (2.5 B, 8.1 B) count it: they are the checkpoints' sizes."""
    seen = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[id(tensor)] = tensor.numel()
    return sum(seen.values())


def parameter_counts(hub_id: str) -> dict[str, int]:
    """Stored elements of each component of `hub_id` (see `stored_count`), counted on its meta model."""
    return {component: stored_count(meta_model(hub_id, component)) for component in CONFIGS[hub_id]}
