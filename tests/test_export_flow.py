"""Flux.1 and SD3 LoRAs exported in kohya's / ComfyUI's layout read back, through diffusers' own converters, as the
same weight updates boothkit trained, and change a transformer's output exactly as the original LoRA does."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from flux_kohya import flux_converter
from safetensors import safe_open

from boothkit.adapters.lora import adapter_metadata, save_lora_file
from boothkit.core.errors import BoothkitError
from boothkit.export import formats as E

RANK, ALPHA = 4, 8.0  # alpha != rank: a lost, doubled or misread alpha changes every ΔW
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
D = 32  # the small transformers' width (2 heads of 16)


# ------------------------------------------------------------------------------------------- helpers

def lora_on(model, targets, seed, exclude=None) -> dict[str, torch.Tensor]:
    """peft LoRA (RANK, ALPHA) on `targets` with random A and B (B nonzero, so the LoRA changes the output)."""
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, exclude_modules=exclude),
                            model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in name else 1 / p.shape[1] ** 0.5))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def save_run(path, family, layers, kind="lora"):
    """A boothkit run's LoRA file: component-prefixed PEFT keys, lora_adapter_metadata, boothkit.family."""
    targets = {c: {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in sd} for c, sd in layers.items()}
    adapters = {c: adapter_metadata(targets[c], RANK, ALPHA, kind) for c in layers}
    info = {"family": family, "rank": RANK, "alpha": ALPHA, "base_model": f"tiny-{family}"}
    return save_lora_file(path, layers, adapters, info, kind)


def export(src, out, fmt="kohya"):
    return E.export(E.export_config(lora=str(src), format=fmt, out=str(out)))


def delta_w(sd, scale=ALPHA / RANK, a="lora_A", b="lora_B", probe=False) -> dict[str, torch.Tensor]:
    """module -> scale · B @ A, in float64; with probe, ΔW @ P for a fixed random P of 8 columns instead (two ΔW
    that differ give different ΔW @ P with probability 1, at a fraction of the cost of full-width matrices)."""
    def right(x):
        return x @ torch.randn(x.shape[1], 8, generator=torch.Generator().manual_seed(x.shape[1]),
                               dtype=torch.float64) if probe else x

    return {k[:-len(f".{a}.weight")]: scale * sd[k.replace(a, b)].double() @ right(sd[k].double())
            for k in sd if k.endswith(f".{a}.weight")}


def assert_same_deltas(mine, theirs, names):
    assert set(names) <= set(theirs), sorted(set(names) - set(theirs))
    for m in names:
        torch.testing.assert_close(theirs[m], mine[m], rtol=1e-5, atol=1e-6, msg=m)


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


# ---------------------------------------------------------------------------- Flux: full-width ΔW

def test_flux_kohya_reads_back_through_diffusers_at_flux_dev_widths(tmp_path):
    """Flux.1-dev's shapes (3072 wide, MLP 12288, first and last blocks), read by FluxPipeline.lora_state_dict."""
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(0)
    w, mlp = 3072, 12288
    shapes = {}
    for i in (0, 18):
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            shapes[f"transformer_blocks.{i}.attn.{m}"] = (w, w)
    for i in (0, 37):
        shapes.update({f"single_transformer_blocks.{i}.attn.{m}": (w, w) for m in ("to_q", "to_k", "to_v")})
        shapes[f"single_transformer_blocks.{i}.proj_mlp"] = (mlp, w)
        shapes[f"single_transformer_blocks.{i}.proj_out"] = (w, w + mlp)
    te_shapes = {"text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
                 "text_model.encoder.layers.11.mlp.fc1": (3072, 768)}

    def peft(shapes):
        return {k: v for m, (o, i) in shapes.items() for k, v in
                ((f"{m}.lora_A.weight", torch.randn(RANK, i, generator=gen) / i ** 0.5),
                 (f"{m}.lora_B.weight", torch.randn(o, RANK, generator=gen) * 0.1))}

    layers = {"transformer": peft(shapes), "text_encoder": peft(te_shapes)}
    out = export(save_run(tmp_path / "flux.safetensors", "flux", layers), tmp_path / "kohya.safetensors")
    tensors, meta = read(out)
    assert "lora_unet_double_blocks_18_img_attn_qkv.lora_down.weight" in tensors
    assert tensors["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (3 * w + mlp, 4 * RANK)
    assert float(tensors["lora_unet_single_blocks_37_linear1.alpha"]) == 4 * ALPHA
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert all(f"{n}.alpha" in tensors for n in names)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), "8")

    converted = FluxPipeline.lora_state_dict(str(out))
    mine = delta_w(layers["transformer"], probe=True)
    # diffusers folds alpha / rank into lora_A: the product is the whole update
    theirs = delta_w({k.removeprefix("transformer."): v for k, v in converted.items() if k.startswith("transformer.")},
                     scale=1.0, probe=True)
    assert_same_deltas(mine, theirs, mine)
    assert set(theirs) == set(mine)
    te = {k.removeprefix("text_encoder."): v for k, v in converted.items() if k.startswith("text_encoder.")}
    te = {k.replace("to_q_lora", "q_proj.lora").replace("lora_linear_layer", "lora"): v for k, v in te.items()}
    assert_same_deltas(delta_w(layers["text_encoder"]), delta_w(te, 1.0, "lora.down", "lora.up"), te_shapes)
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in converted)


# ----------------------------------------------------------------------- Flux: the model's output

def small_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def flux_out(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, 64, generator=gen),
                     encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                     pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                     img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]


def small_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16)).eval()


def clip_out(model):
    with torch.no_grad():
        return model(torch.arange(10)[None]).last_hidden_state


@pytest.mark.parametrize("targets", [FLUX_TARGETS, ["to_q", "to_v", "add_k_proj", "proj_mlp"]],
                         ids=["default", "partial"])
def test_flux_kohya_loads_into_transformer_and_text_encoder(tmp_path, targets):
    """The exported file, converted by diffusers and loaded with load_lora_adapter, gives the original LoRA's
    output; with only some of a fused layer's parts trained the others come back as zero updates."""
    from diffusers import FluxPipeline

    base, lora = small_flux(), small_flux()
    # the top-level proj_out (the final layer) is not targeted; the single blocks' proj_out (linear2) is
    layers = {"transformer": lora_on(lora, targets, seed=2, exclude="proj_out")}
    te_base, te_lora = small_clip(), small_clip()
    layers["text_encoder"] = {f"text_model.{k}": v for k, v in lora_on(te_lora, TE_TARGETS, seed=3).items()}
    out = export(save_run(tmp_path / "flux.safetensors", "flux", layers), tmp_path / "kohya.safetensors")

    converted = flux_converter([D, D, D, 4 * D])(read(out)[0])
    mine = delta_w(layers["transformer"])
    theirs = delta_w({k.removeprefix("transformer."): v for k, v in converted.items() if k.startswith("transformer.")},
                     scale=1.0)
    assert_same_deltas(mine, theirs, mine)
    assert all(not theirs[m].any() for m in set(theirs) - set(mine))  # the zero blocks of untrained parts

    base.load_lora_adapter({k: v for k, v in converted.items() if k.startswith("transformer.")},
                           prefix="transformer", adapter_name="kohya")
    assert (flux_out(lora) - flux_out(small_flux())).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(flux_out(base), flux_out(lora), rtol=1e-4, atol=1e-5)

    FluxPipeline.load_lora_into_text_encoder(converted, network_alphas=None, text_encoder=te_base,
                                             prefix="text_encoder", adapter_name="kohya")
    assert (clip_out(te_lora) - clip_out(small_clip())).abs().max() > 1e-2
    torch.testing.assert_close(clip_out(te_base), clip_out(te_lora), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- SD3

def small_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=D,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def sd3_out(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                     encoder_hidden_states=torch.randn(1, 6, 16, generator=gen),
                     pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([500.0]),
                     return_dict=False)[0]


class _Checkpoint(dict):
    """An MMDiT checkpoint holding only the LoRA'd weights: diffusers' converter pops every weight of the model,
    and the ones the LoRA does not touch get a placeholder (discarded after conversion)."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(6)


def test_sd3_comfyui_names_convert_back_with_diffusers_single_file_converter(tmp_path):
    """diffusers 0.42.1 reads no kohya / ComfyUI SD3 LoRA (SD3LoraLoaderMixin.lora_state_dict converts nothing), so
    the check is the weight update ComfyUI applies: each lora_unet_<path> is patched onto the MMDiT weight <path>
    (ComfyUI's model_lora_keys_unet), and diffusers' own convert_sd3_transformer_checkpoint_to_diffusers maps those
    weights to its modules. The update it gives every diffusers module must be boothkit's, and the model patched
    with it must give the LoRA'd model's output."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    base, lora = small_sd3(), small_sd3()
    layers = {"transformer": lora_on(lora, SD3_TARGETS, seed=4)}
    outs = {fmt: export(save_run(tmp_path / "sd3.safetensors", "sd3", layers), tmp_path / f"{fmt}.safetensors", fmt)
            for fmt in ("kohya", "comfyui")}
    tensors, meta = read(outs["comfyui"])
    assert tensors.keys() == read(outs["kohya"])[0].keys()  # sd-scripts' SD3 names are ComfyUI's
    assert meta["ss_base_model_version"] == "sd3" and meta["boothkit.export_format"] == "comfyui"
    paths = {f"joint_blocks.{i}.{side}.attn.{m}" for i in range(2) for side in ("x_block", "context_block")
             for m in ("qkv", "proj")}
    by_name = {"lora_unet_" + p.replace(".", "_"): p for p in paths}  # ComfyUI's key map
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert names <= set(by_name) and "lora_unet_joint_blocks_1_context_block_attn_qkv" in names
    checkpoint = _Checkpoint({"context_embedder.weight": torch.zeros(D, 16)})
    for n in names:
        down, up = tensors[f"{n}.lora_down.weight"].double(), tensors[f"{n}.lora_up.weight"].double()
        checkpoint[by_name[n] + ".weight"] = float(tensors[f"{n}.alpha"]) / down.shape[0] * up @ down
    theirs = {k.removesuffix(".weight"): v for k, v in convert_sd3_transformer_checkpoint_to_diffusers(checkpoint).items()
              if v.ndim == 2}
    mine = delta_w(layers["transformer"])
    assert_same_deltas(mine, theirs, mine)
    assert not checkpoint  # every exported weight was consumed

    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.removesuffix(".weight") in mine:
                p += theirs[name.removesuffix(".weight")].float()
    assert (sd3_out(lora) - sd3_out(small_sd3())).abs().max() > 1e-2
    torch.testing.assert_close(sd3_out(base), sd3_out(lora), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ refusals

def tiny_layers(model_targets=("to_q",), comp="transformer", module="transformer_blocks.0.attn"):
    gen = torch.Generator().manual_seed(0)
    prefix = f"{module}." if module else ""
    return {comp: {f"{prefix}{t}.lora_{ab}.weight": torch.randn(*((RANK, D) if ab == "A" else (D, RANK)), generator=gen)
                   for t in model_targets for ab in "AB"}}


@pytest.mark.parametrize("family, layers, fmt, message", [
    ("flux", tiny_layers(), "merged-single-file", "flux LoRA: --format merged-single-file is not supported"),
    ("flux", tiny_layers(), "merged", "supported for flux: --adapter lora with --format diffusers, kohya, comfyui"),
    ("flux", tiny_layers(comp="text_encoder_2", module="encoder.block.0.layer.0.SelfAttention", model_targets=("q",)),
     "kohya", "a text_encoder_2 LoRA cannot be exported for flux"),
    ("flux", tiny_layers(module="", model_targets=("proj_out",)), "kohya", "module 'proj_out' has no kohya"),
    ("sd3", tiny_layers(comp="text_encoder_3", module="encoder.block.0.layer.0.SelfAttention", model_targets=("q",)),
     "comfyui", "a text_encoder_3 LoRA cannot be exported for sd3"),
    ("wan", tiny_layers(), "kohya", "export of the wan family is not supported (supported: sd, sdxl, flux, sd3)"),
])
def test_unsupported_exports_are_one_line_errors(tmp_path, family, layers, fmt, message):
    src = save_run(tmp_path / "x.safetensors", family, layers)
    out = tmp_path / ("merged" if fmt == "merged" else "out.safetensors")
    with pytest.raises(BoothkitError) as err:
        export(src, out, fmt)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_flux_lokr_is_refused(tmp_path):
    layers = {"transformer": {"transformer_blocks.0.attn.to_q.lokr_w1": torch.ones(2, 2),
                              "transformer_blocks.0.attn.to_q.lokr_w2": torch.ones(16, 16)}}
    src = save_run(tmp_path / "lokr.safetensors", "flux", layers, kind="lokr")
    with pytest.raises(BoothkitError, match=r"flux LoRA: --adapter lokr is not supported \(supported for flux"):
        export(src, tmp_path / "out.safetensors")


def test_flux_diffusers_format_is_the_file_as_it_is(tmp_path):
    layers = tiny_layers(("to_q", "to_k"))
    src = save_run(tmp_path / "x.safetensors", "flux", layers)
    tensors, meta = read(export(src, tmp_path / "d.safetensors", "diffusers"))
    assert set(tensors) == {f"transformer.{k}" for k in layers["transformer"]}
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == ALPHA
