"""Flux.1 and SD3 LoRAs in kohya's / ComfyUI's layout: the families' export facts (`FLOW_FAMILIES`) and the fusing of
boothkit's per-projection LoRAs into LoRAs on the original models' fused layers (`fused_tensors`).

The original Flux and SD3 models compute q, k and v (Flux's single blocks: q, k, v and the MLP input) with one
Linear; diffusers splits it, and boothkit trains a LoRA (A_i, B_i, rank r) on each part. On the fused layer these are
one LoRA of rank k·r, written as sd-scripts' ``split_qkv`` network saves itself: ``lora_down`` = cat(A_1..A_k),
``lora_up`` = the block-diagonal of B_1..B_k, so up @ down = cat(B_i @ A_i) row block by row block. Its ``alpha``
is alpha·k, so that alpha / rank, the scale every reader applies, stays boothkit's alpha / r (sd-scripts keeps alpha
unchanged there, which scales its own split files by 1/k in every reader). A part that was not trained is a zero
block. diffusers (``_convert_kohya_flux_lora_to_diffusers``) sees the zero off-diagonal blocks and splits the file
back into the k LoRAs of rank r; ComfyUI and sd-scripts apply the fused product directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from ..core.errors import BoothkitError
from .naming import flow_name

if TYPE_CHECKING:  # torch is imported where it is used, so `boothkit --help` stays fast
    import torch


@dataclass(frozen=True)
class FlowFamily:
    """What a kohya / ComfyUI export of one transformer family writes besides the tensors."""

    name: str
    version: str          # ss_base_model_version
    network_module: str   # ss_network_module: sd-scripts' LoRA network for the family
    architecture: str     # modelspec.architecture (without /lora)
    formats: tuple[str, ...] = ("diffusers", "kohya", "comfyui")  # kohya's layout is ComfyUI's for these


# every component a Flux / SD3 pipeline can carry a LoRA on; the ones without a kohya name (T5) are refused by name
FLOW_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
FLOW_FAMILIES = {
    "flux": FlowFamily("flux", "flux1", "networks.lora_flux", "flux-1-dev"),
    "sd3": FlowFamily("sd3", "sd3", "networks.lora_sd3", "stable-diffusion-3-medium"),
}


def flow_family(family: str, fmt: str, kind: str) -> FlowFamily:
    """The family's export facts; a format or adapter kind the export does not write for it is a one-line error."""
    spec = FLOW_FAMILIES[family]
    if kind != "lora" or fmt not in spec.formats:
        what = f"--format {fmt}" if kind == "lora" else f"--adapter {kind}"
        raise BoothkitError(f"export of a {family} LoRA: {what} is not supported (supported for {family}: "
                            f"--adapter lora with --format {', '.join(spec.formats)})")
    return spec


def fused_tensors(family: str, modules: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                  alpha: Mapping[str, float], rank: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """<name>.lora_down.weight / .lora_up.weight / .alpha for every kohya module, fused parts joined as the module
    docstring says. modules: component -> diffusers module -> (lora_A, lora_B)."""
    import torch

    groups: dict[str, dict] = {}  # kohya name -> {component, widths, parts: index -> (A, B)}
    for comp, mods in modules.items():
        for module, pair in mods.items():
            name, part, widths = flow_name(family, comp, module)
            group = groups.setdefault(name, {"component": comp, "widths": widths, "parts": {}})
            if part in group["parts"]:
                raise BoothkitError(f"two LoRA modules map to the same part of '{name}'")
            group["parts"][part] = pair
    out: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        comp, widths, parts = group["component"], group["widths"], group["parts"]
        down, up = _fuse(name, widths, parts, rank[comp])
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(alpha[comp]) * len(widths))
    return out


def _fuse(name: str, widths: tuple[int, ...], parts: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
          r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cat(A_i) and block-diag(B_i) over the fused layer's parts; an untrained part is a zero block whose width
    comes from a trained one's through the parts' relative widths."""
    import torch

    if len(widths) == 1:
        return parts[0]
    a0, b0 = next(iter(parts.values()))
    i0 = next(iter(parts))
    unit, rem = divmod(b0.shape[0], widths[i0])
    if rem:
        raise BoothkitError(f"'{name}': a part of {b0.shape[0]} rows does not fit the fused layer's layout")
    downs, ups = [], []
    for i, w in enumerate(widths):
        a, b = parts.get(i, (a0.new_zeros(r, a0.shape[1]), b0.new_zeros(w * unit, r)))
        if a.shape != (r, a0.shape[1]) or b.shape != (w * unit, r):
            raise BoothkitError(f"'{name}': part {i} has shapes {tuple(a.shape)} / {tuple(b.shape)}, not the "
                                f"fused layer's ({r}, {a0.shape[1]}) / ({w * unit}, {r})")
        downs.append(a)
        ups.append(b)
    return torch.cat(downs), torch.block_diag(*ups)
