"""Export a boothkit LoRA for other tools: diffusers, kohya/A1111, ComfyUI, or a merged model.

Formats (``boothkit export --format ...``):

- ``diffusers``: the native file (PEFT ``lora_A``/``lora_B`` keys per component, ``lora_adapter_metadata``).
- ``kohya``: what kohya-ss sd-scripts writes for SD 1.x/2.x and what AUTOMATIC1111 reads. One entry per LoRA'd
  module, named ``lora_unet_<diffusers UNet module path, '.' -> '_'>`` (kohya trains SD 1.x on a UNet with
  diffusers module names, e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) or
  ``lora_te_<transformers-4 CLIPTextModel path>`` (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``;
  transformers 5 dropped the ``text_model.`` prefix, it is put back), each with ``.lora_down.weight`` (= PEFT
  lora_A), ``.lora_up.weight`` (= lora_B) and a scalar ``.alpha`` (update scale = alpha / rank). Metadata:
  the ``ss_*`` keys kohya and A1111 read (ss_network_module, ss_network_dim, ss_network_alpha,
  ss_base_model_version, ss_output_name, ...), ``modelspec.*`` and boothkit's own ``boothkit.*``.
- ``comfyui``: the same lora_down/lora_up/alpha triples, but UNet modules named by their path in the ORIGINAL
  (ldm) SD UNet: ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``. ComfyUI's LoRA loader
  (comfy/lora.py ``model_lora_keys_unet``) builds its key map straight from its model's state dict
  (``diffusion_model.<path>.weight`` -> ``lora_unet_<path with '_'>``), so these keys need no diffusers-name
  translation; text-encoder keys are ``lora_te_text_model_encoder_layers_N_<self_attn_q_proj|...|mlp_fc1>``,
  which ``model_lora_keys_clip`` maps onto CLIP-L. diffusers also loads this layout
  (``load_lora_weights(file, unet_config=pipe.unet.config)``, its sgm-block remapping).
- Flux.1 and SD3 runs (``boothkit.family`` flux / sd3, the table ``export.flow.FLOW_FAMILIES``): ``kohya`` and
  ``comfyui`` write one layout, sd-scripts' lora_flux / lora_sd3 names, which ComfyUI reads as its own model's:
  ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``,
  ``lora_unet_joint_blocks_0_x_block_attn_qkv``, CLIP text encoders as ``lora_te1_`` / ``lora_te2_``; q/k/v (and
  Flux's MLP input) fused as export.flow describes. ``diffusers`` copies the file; anything else is refused.
- ``merged``: a full diffusers model folder with the LoRA fused in at ``--unet-scale`` / ``--text-encoder-scale``.
- ``merged-single-file``: the same fused model as one ``.safetensors`` checkpoint in the original SD layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), the
  inverse of diffusers' ``convert_ldm_*_checkpoint``; loads with ``from_single_file(path, config=<folder>)``.

Every file is safetensors (no pickles), metadata values are strings, and every write is atomic.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .. import __version__
from ..core.config import build, check_output, opt, save_toml, to_dict
from ..core.errors import BoothkitError, ConfigError, ModelError
from ..core.files import atomic_folder, atomic_write_bytes, check_free_space, remove_stale_temps
from .flow import FLOW_COMPONENTS, FLOW_FAMILIES, FlowFamily, flow_family, fused_tensors
from .naming import comfyui_name, is_xl, kohya_name, ldm_state_dict

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

if TYPE_CHECKING:  # torch is imported where it is used, so `boothkit --help` stays fast
    import torch

log = logging.getLogger("boothkit")
FORMATS = ("diffusers", "kohya", "comfyui", "merged", "merged-single-file")
UNET_FAMILIES = ("sd", "sdxl")  # what the writers below export; the transformer families' facts are FLOW_FAMILIES
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ExportConfig:
    lora: str = opt("", "boothkit output folder or LoRA .safetensors file.", required=True)
    format: str = opt("kohya", "Target format.", choices=FORMATS)
    out: str = opt("", "Output .safetensors file (a folder for --format merged).", required=True)
    model: Optional[str] = opt(None, "Base model for merged formats; default: the one named in the LoRA's metadata.")
    model_config: Optional[str] = opt(None, "Local diffusers folder describing a single-file base model.")
    unet_scale: float = opt(1.0, "LoRA scale fused into the UNet (merged formats).")
    text_encoder_scale: float = opt(1.0, "LoRA scale fused into the text encoder (merged formats).")
    save_precision: str = opt("fp32", "Precision of the saved weights.", choices=PRECISIONS)
    output_name: Optional[str] = opt(None, "Name stored as ss_output_name / modelspec.title; default: --out's stem.")
    overwrite: bool = opt(False, "Replace --out if it exists.")

    def validate(self) -> None:
        if self.format != "merged" and not self.out.endswith(".safetensors"):
            raise ConfigError(f"export.out: --format {self.format} writes one file; give a .safetensors path")


EXPORT_SECTIONS: dict[str, type] = {"export": ExportConfig}


def torch_dtype(precision: str) -> "torch.dtype":
    from ..core.precision import DTYPES

    return DTYPES[precision]


def export_config(**values: Any) -> ExportConfig:
    """An ExportConfig validated like one read from TOML or flags."""
    return build(ExportConfig, values, "export")


# ------------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class LoraWeights:
    """A diffusers-format LoRA split per component: module -> (down = lora_A, up = lora_B), and alpha."""

    modules: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]
    alpha: Mapping[str, float]
    rank: Mapping[str, int]
    info: Mapping[str, str]
    metadata: Mapping[str, str]


def read_lora(path: str | Path, components: tuple[str, ...] | None = None) -> LoraWeights:
    """Read a diffusers-format LoRA file (boothkit's, or one from diffusers' training scripts) whose keys start
    with one of `components` (default: the UNet families' LoRA components)."""
    from safetensors import safe_open

    from ..adapters.lora import lora_header
    from ..models.families import LORA_COMPONENTS

    file, meta, keys = lora_header(path)  # a damaged or foreign file is named before any tensor is read
    with safe_open(str(file), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in keys}
    adapter = _adapter_metadata(file, meta)
    components = components or LORA_COMPONENTS
    pattern = re.compile(rf"^({'|'.join(components)})\.(.+)\.lora_([AB])\.weight$")
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: {} for c in components}
    for key, value in tensors.items():
        if key.endswith(".lora_magnitude_vector"):  # DoRA: only merged exports read it, through diffusers
            continue
        m = pattern.match(key)
        if m is None:
            raise BoothkitError(f"--lora {file}: unexpected key '{key}' (not a diffusers/PEFT LoRA file; "
                                "full fine-tunes are already diffusers models)")
        parts[m[1]].setdefault(m[2], {})[m[3]] = value
    modules, alpha, rank = {}, {}, {}
    for comp, mods in parts.items():
        if not mods:
            continue
        for name, ab in mods.items():
            if set(ab) != {"A", "B"}:
                raise BoothkitError(f"--lora {file}: module '{comp}.{name}' lacks lora_A or lora_B")
        modules[comp] = {name: (ab["A"], ab["B"]) for name, ab in sorted(mods.items())}
        ranks = {ab["A"].shape[0] for ab in mods.values()}
        if len(ranks) != 1 or f"{comp}.rank_pattern" in adapter and adapter[f"{comp}.rank_pattern"]:
            raise BoothkitError(f"--lora {file}: per-module ranks in {comp} are not supported")
        rank[comp] = ranks.pop()
        # diffusers' rule: without stored alpha the scale is 1 (alpha = rank)
        alpha[comp] = float(adapter.get(f"{comp}.lora_alpha", rank[comp]))
    if not modules:
        raise BoothkitError(f"--lora {file}: no LoRA weights in the file")
    info = {k[len("boothkit."):]: v for k, v in meta.items() if k.startswith("boothkit.")}
    return LoraWeights(modules, alpha, rank, info, meta)


def _adapter_metadata(file: Path, meta: Mapping[str, str]) -> dict:
    """The LoraConfig fields diffusers stored under lora_adapter_metadata; damaged JSON names the file."""
    try:
        adapter = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except ValueError as exc:
        raise BoothkitError(f"--lora {file}: not a LoRA safetensors file (lora_adapter_metadata: {exc})") from None
    if not isinstance(adapter, dict):
        raise BoothkitError(f"--lora {file}: not a LoRA safetensors file (lora_adapter_metadata is not a table)")
    return adapter


# ------------------------------------------------------------------------------------------- writers

def _unet_config(weights: LoraWeights, cfg: ExportConfig) -> dict[str, Any]:
    """The base model's UNet config (ComfyUI names need its block layout), read without loading weights."""
    from diffusers import UNet2DConditionModel

    from ..models.loading import model_path

    base = cfg.model or weights.info.get("base_model")
    if not base:
        raise ConfigError("export.model is required (--model): the LoRA does not name its base model")
    folder = cfg.model_config if base.endswith(".safetensors") else model_path(base)
    try:
        return dict(UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True))
    except Exception:
        raise ModelError(f"--model {base}: cannot read its unet/config.json (pass a local diffusers folder with "
                         "--model, or --model-config for a single-file model)") from None


def _base_model_version(unet_config: Mapping[str, Any] | None) -> str:
    """kohya's ss_base_model_version: SDXL's UNet has text_time conditioning; SD 2.x has 1024-wide
    cross-attention (OpenCLIP-H), SD 1.x 768."""
    if is_xl(unet_config):
        return "sdxl_base_v1-0"
    return "sd_v2" if unet_config and unet_config.get("cross_attention_dim") == 1024 else "sd_v1"


_ARCHITECTURE = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


def _ss_metadata(weights: LoraWeights, cfg: ExportConfig, name: str, version: str,
                 architecture: str | None = None) -> dict[str, str]:
    """Metadata kohya's sd-scripts writes and A1111 / kohya tools read, plus boothkit's own keys."""
    info = weights.info
    comp = next((c for c in ("unet", "transformer") if c in weights.rank), next(iter(weights.rank)))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(weights.rank[comp]),
        "ss_network_alpha": f"{weights.alpha[comp]:g}",
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_output_name": name,
        "ss_sd_model_name": Path(info.get("base_model", "")).name or "unknown",
        "ss_training_comment": f"DreamBooth LoRA by boothkit {info.get('version', __version__)}",
        "ss_max_train_steps": info.get("steps", ""),
        "ss_tag_frequency": json.dumps({"boothkit": {p: 1 for p in [info.get("instance_prompt")] if p}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture or _ARCHITECTURE[version]}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
    }
    meta = {k: v for k, v in meta.items() if v != ""}
    meta.update({f"boothkit.{k}": str(v) for k, v in info.items()})
    meta["boothkit.exported_by"] = __version__
    return meta


def _save_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
               cfg: ExportConfig) -> Path:
    """safetensors (never pickle), cast to --save-precision, written atomically."""
    from safetensors.torch import save


    metadata = {**metadata, "boothkit.export_config": json.dumps(to_dict(cfg), sort_keys=True)}
    dtype = torch_dtype(cfg.save_precision)
    data = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    blob = save(data, metadata={"format": "pt", **metadata})
    check_free_space(path.parent, len(blob), f"--out {path}")
    atomic_write_bytes(path, blob)
    return path


def export_triples(weights: LoraWeights, namer) -> dict[str, torch.Tensor]:
    """kohya-style tensors: <name>.lora_down.weight / .lora_up.weight / .alpha for every module."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for comp, mods in weights.modules.items():
        for module, (down, up) in mods.items():
            name = namer(comp, module)
            if f"{name}.alpha" in out:
                raise BoothkitError(f"two LoRA modules map to the same name '{name}'")
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(weights.alpha[comp])
    return out


def write_lora_export(weights: LoraWeights, cfg: ExportConfig) -> Path:
    """diffusers / kohya / comfyui: a LoRA file in another key layout."""
    out = Path(cfg.out)
    name = cfg.output_name or out.stem
    if cfg.format == "diffusers":
        tensors = {f"{comp}.{m}.lora_{ab}.weight": t for comp, mods in weights.modules.items()
                   for m, pair in mods.items() for ab, t in zip("AB", pair)}
        return _save_file(out, tensors, {k: v for k, v in weights.metadata.items() if k != "format"}, cfg)
    namer, unet_config = _namer(weights, cfg)
    tensors = export_triples(weights, namer)
    meta = _ss_metadata(weights, cfg, name, _base_model_version(unet_config))
    meta["boothkit.export_format"] = cfg.format
    return _save_file(out, tensors, meta, cfg)


def _namer(weights: LoraWeights, cfg: ExportConfig):
    """(component, module) -> kohya or ComfyUI module name for --format, and the base UNet config (or None)."""
    unet_config = _unet_config(weights, cfg) if cfg.format == "comfyui" or "text_encoder_2" in weights.modules \
        else None
    if cfg.format == "comfyui":
        return (lambda c, m: comfyui_name(c, m, unet_config)), unet_config
    if unet_config is None:
        try:
            unet_config = _unet_config(weights, cfg)
        except BoothkitError:  # an SD 1.x/2.x base needs no config for the names, only for the version tag
            if weights.info.get("family") == "sdxl":
                raise
    return (lambda c, m: kohya_name(c, m, unet_config)), unet_config


# ------------------------------------------------------------------------------- DoRA, LoKr and LoHa

_LYCORIS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.((?:lokr|hada)_w[12](?:_[ab])?)$")


def read_lycoris(path: str | Path) -> LoraWeights:
    """A boothkit LoKr/LoHa file: component -> module -> {peft name (lokr_w1, hada_w1_a, ...): tensor}."""
    from safetensors.torch import load_file

    from ..adapters.lora import lora_header, lycoris_config

    file, meta, _ = lora_header(path)
    configs = lycoris_config(file, meta, str(path))
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in load_file(str(file)).items():
        m = _LYCORIS_KEY.match(key)
        if m is None or m[1] not in configs:
            raise BoothkitError(f"--lora {file}: unexpected key '{key}' in a {meta['boothkit.adapter']} file")
        modules.setdefault(m[1], {}).setdefault(m[2], {})[m[3]] = value
    info = {k[len("boothkit."):]: v for k, v in meta.items() if k.startswith("boothkit.")}
    return LoraWeights(modules, {c: float(configs[c]["alpha"]) for c in modules},
                       {c: int(configs[c]["r"]) for c in modules}, info, meta)


def lycoris_tensors(weights: LoraWeights, namer) -> dict[str, torch.Tensor]:
    """LyCORIS keys as A1111 and ComfyUI read them: <name>.lokr_w1 ... / <name>.hada_w1_a ... and <name>.alpha.

    Those readers scale a LoHa, and a LoKr with a rank-decomposed factor, by alpha / rank as peft does; a LoKr
    of two full factors they do not scale at all, so peft's alpha / r goes into lokr_w1, and its alpha is the rank
    (as LyCORIS writes it; LyCORIS's own loader needs the key, the others ignore it there)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for comp, mods in weights.modules.items():
        scale = weights.alpha[comp] / weights.rank[comp]
        for module, parts in mods.items():
            name = namer(comp, module)
            if any(k.startswith(name + ".") for k in out):
                raise BoothkitError(f"two adapter modules map to the same name '{name}'")
            parts = dict(parts)
            full = "lokr_w1" in parts and "lokr_w2" in parts
            if full:
                parts["lokr_w1"] = parts["lokr_w1"] * scale
            out[f"{name}.alpha"] = torch.tensor(float(weights.rank[comp] if full else weights.alpha[comp]))
            out.update({f"{name}.{k}": v for k, v in parts.items()})
    return out


def export_adapter(cfg: ExportConfig, kind: str) -> Path:
    """Export a DoRA, LoKr or LoHa file where its format is known to load back; refuse the rest in one line."""
    from safetensors.torch import load_file

    from ..adapters.lora import lora_header

    out = Path(cfg.out)
    if cfg.format == "diffusers":  # the file as it is (plain diffusers loads a DoRA; boothkit a LoKr/LoHa)
        file, meta, _ = lora_header(cfg.lora)
        return _save_file(out, load_file(str(file)), {k: v for k, v in meta.items() if k != "format"}, cfg)
    if kind == "dora" and cfg.format in ("kohya", "comfyui"):
        raise BoothkitError(f"--format {cfg.format}: not available for --adapter dora (diffusers drops kohya's "
                            "dora_scale keys for SD models, so the file could not be checked); use --format "
                            "diffusers or merged")
    weights = read_lora(cfg.lora) if kind == "dora" else read_lycoris(cfg.lora)
    if cfg.format in ("merged", "merged-single-file"):  # fused through diffusers' fuse_lora like a LoRA
        return write_merged(weights, cfg)
    if kind == "loha" and any(weights.alpha[c] != weights.rank[c] for c in weights.modules):
        log.warning("--format %s: a LoHa with alpha %g != rank %d is read as written by A1111 and ComfyUI, but "
                    "lycoris-lora 3.4's own loader scales it by (alpha/rank)²; train with --alpha equal to --rank "
                    "for a file every reader takes alike", cfg.format, *next(
                        (weights.alpha[c], weights.rank[c]) for c in weights.modules))
    namer, unet_config = _namer(weights, cfg)
    meta = _ss_metadata(weights, cfg, cfg.output_name or out.stem, _base_model_version(unet_config))
    meta.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kind}),
                 "boothkit.export_format": cfg.format})
    return _save_file(out, lycoris_tensors(weights, namer), meta, cfg)


# ------------------------------------------------------------------------------------------- merging

def fused_pipeline(cfg: ExportConfig, weights: LoraWeights):
    """Base pipeline with the LoRA fused at the configured scales and the adapter layers removed."""
    from ..adapters.apply import apply_lora
    from ..models.families import family_of
    from ..models.loading import load_pipeline

    base = cfg.model or weights.info.get("base_model")
    if not base:
        raise ConfigError("export.model is required (--model): the LoRA does not name its base model")
    pipe = load_pipeline(base, model_config=cfg.model_config)
    apply_lora(pipe, cfg.lora, cfg.lora, "boothkit", base)
    # one fuse per component: fuse_lora's lora_scale applies to every component it is given
    for comp in family_of(pipe).components:
        scale = cfg.unet_scale if comp == "unet" else cfg.text_encoder_scale
        if comp in weights.modules:
            pipe.fuse_lora(components=[comp], lora_scale=scale, adapter_names=["boothkit"])
    pipe.unload_lora_weights()
    return pipe


def _pipeline_bytes(pipe, precision: str) -> int:
    """What save_pretrained writes, give or take headers: every weight of every model component, at `precision`
    (floating-point tensors only are cast)."""
    import torch

    size = torch_dtype(precision).itemsize
    total = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for t in (*module.parameters(), *module.buffers()):
                total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return total


def write_merged(weights: LoraWeights, cfg: ExportConfig) -> Path:
    """merged: a diffusers folder; merged-single-file: one original-layout .safetensors checkpoint."""
    pipe = fused_pipeline(cfg, weights)
    out = Path(cfg.out)
    info = {**{f"boothkit.{k}": v for k, v in weights.info.items()},
            "boothkit.unet_scale": f"{cfg.unet_scale:g}", "boothkit.text_encoder_scale": f"{cfg.text_encoder_scale:g}",
            "boothkit.export_format": cfg.format, "boothkit.exported_by": __version__}
    if cfg.format == "merged-single-file":
        tensors = ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        return _save_file(out, tensors, info, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out.parent, _pipeline_bytes(pipe, cfg.save_precision) + (1 << 20), f"--out {out}")
    with atomic_folder(out) as tmp:  # an old export (--overwrite) stays whole until the new one replaces it
        if cfg.save_precision != "fp32":
            pipe.to(dtype=torch_dtype(cfg.save_precision))
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_toml(tmp / "boothkit_export.toml", {"export": to_dict(cfg)})
    return out


def export_flow(cfg: ExportConfig, spec: FlowFamily) -> Path:
    """Flux.1 / SD3: the diffusers file as it is, or the kohya layout, which is also ComfyUI's (export.flow)."""
    from safetensors.torch import load_file

    from ..adapters.lora import lora_header

    out = Path(cfg.out)
    if cfg.format == "diffusers":
        file, meta, _ = lora_header(cfg.lora)
        return _save_file(out, load_file(str(file)), {k: v for k, v in meta.items() if k != "format"}, cfg)
    weights = read_lora(cfg.lora, FLOW_COMPONENTS)
    tensors = fused_tensors(spec.name, weights.modules, weights.alpha, weights.rank)
    meta = _ss_metadata(weights, cfg, cfg.output_name or out.stem, spec.version, spec.architecture)
    meta.update({"ss_network_module": spec.network_module, "boothkit.export_format": cfg.format})
    return _save_file(out, tensors, meta, cfg)


def export(cfg: ExportConfig) -> Path:
    """Run one export; returns the written file or folder."""
    out = check_output(cfg.out, "--out", folder=cfg.format == "merged")
    if out.exists() and not cfg.overwrite:
        raise BoothkitError(f"--out {out} exists (pass --overwrite to replace it)")
    if out.parent.is_dir():
        remove_stale_temps(out.parent, out.name)  # what an export killed mid-write left
    from ..adapters.lora import lora_header

    meta = lora_header(cfg.lora)[1]
    kind, family = meta.get("boothkit.adapter", "lora"), meta.get("boothkit.family")
    if family in FLOW_FAMILIES:
        return export_flow(cfg, flow_family(family, cfg.format, kind))
    if family not in (None, *UNET_FAMILIES):  # a file without boothkit.family is an SD 1.x/2.x or SDXL one
        raise BoothkitError(f"--lora {cfg.lora}: export of the {family} family is not supported (supported: "
                            f"{', '.join((*UNET_FAMILIES, *FLOW_FAMILIES))})")
    if kind != "lora":
        return export_adapter(cfg, kind)
    weights = read_lora(cfg.lora)
    if cfg.format in ("merged", "merged-single-file"):
        return write_merged(weights, cfg)
    return write_lora_export(weights, cfg)
