"""--adapter dora / lokr / loha: each trains, saves a file naming its adapter, and `boothkit generate` draws what an
independent load draws (plain diffusers for DoRA; the LyCORIS weight-delta formula for LoKr/LoHa); exports
round-trip or refuse in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.export import formats as E
from boothkit.generate import generation as G
from boothkit.core.errors import BoothkitError, ConfigError
from boothkit.adapters.lora import LORA_FILE
from boothkit.train.loop import run_training

PROMPT = "a photo of sks dog"
U, T = 0.8, 0.6  # distinct, non-unit scales: swapped or ignored scales show up
ZERO_INIT = {"dora": "lora_B", "lokr": "lokr_w1", "loha": "hada_w2_b"}  # the factor peft starts at 0


def make_cfg(instance_dir, out, **over):
    values = {"instance_dir": str(instance_dir), "token": "sks", "class_noun": "dog", "output_dir": str(out),
              "max_steps": 3, "prior": False, "rank": 4, "alpha": 8.0, "learning_rate": 5e-2,
              "text_encoder_lr": 5e-2, "train_text_encoder": True}
    return C.resolve(C.TRAIN_SECTIONS, {}, {**values, **over})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_subject, one_thread) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    return {k: run_training(make_cfg(demo_subject, root / k, adapter=k), progress=False) for k in ZERO_INIT}


def picture(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0)).images[0]


def ours(run) -> np.ndarray:
    pipe = G.load_generation_pipeline(None, [(str(run), 1.0)])
    G.set_lora_scales(pipe, U, T)
    return picture(pipe)


def plain_pipe(tiny_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("kind", ZERO_INIT)
def test_adapter_trains_and_its_file_names_it(runs, kind):
    file = runs[kind] / LORA_FILE
    with safe_open(str(file), "pt") as fh:
        meta = fh.metadata()
    assert meta["boothkit.adapter"] == kind
    tensors = load_file(str(file))
    for comp in ("unet", "text_encoder"):  # the zero-initialised factor moved in both components
        moved = [v for k, v in tensors.items() if k.startswith(comp + ".") and ZERO_INIT[kind] in k]
        assert moved and all(v.abs().max() > 0 for v in moved)
    if kind == "dora":
        assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
        assert any(k.endswith(".lora_magnitude_vector") for k in tensors)
    else:
        assert "lora_adapter_metadata" not in meta and json.loads(meta["boothkit.adapter_config"])["unet.r"] == 4


@pytest.mark.slow
def test_dora_generates_what_plain_diffusers_draws(runs, tiny_path):
    plain = plain_pipe(tiny_path)
    base = picture(plain)
    plain.load_lora_weights(str(runs["dora"]), adapter_name="x")
    plain.set_adapters(["x"], adapter_weights=[{"unet": U, "text_encoder": T}])
    theirs = picture(plain)
    assert np.abs(theirs - base).max() > 0.01  # the DoRA matters
    assert np.abs(ours(runs["dora"]) - theirs).max() < 1e-4


def lycoris_delta(parts: dict, scale: float) -> torch.Tensor:
    """The weight update as LyCORIS readers (ComfyUI, A1111) compute it from peft-named factors."""
    if "hada_w1_a" in parts:
        return (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * scale
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    return torch.kron(w1, w2) * scale


def grouped(tensors: dict) -> dict:
    out: dict = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".")
        out.setdefault(module, {})[part] = value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_generates_base_plus_the_independent_delta(runs, tiny_path, kind):
    plain = plain_pipe(tiny_path)
    base = picture(plain)
    scales = {"unet": U, "text_encoder": T}
    with torch.no_grad():
        for module, parts in grouped(load_file(str(runs[kind] / LORA_FILE))).items():
            comp, _, path = module.partition(".")
            model = getattr(plain, comp)
            if comp == "text_encoder" and not hasattr(model, "text_model"):
                path = path.removeprefix("text_model.")
            layer = model.get_submodule(path)
            layer.weight += lycoris_delta(parts, 8.0 / 4) * scales[comp]
    theirs = picture(plain)
    assert np.abs(theirs - base).max() > 0.01
    assert np.abs(ours(runs[kind]) - theirs).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_kohya_export_gives_the_same_deltas(runs, tmp_path, kind):
    ours_file = load_file(str(runs[kind] / LORA_FILE))
    want = {k: lycoris_delta(p, 2.0) for k, p in grouped(ours_file).items()}
    out = tmp_path / "k.safetensors"
    E.export(E.export_config(lora=str(runs[kind]), format="kohya", out=str(out)))
    got = grouped(load_file(str(out)))
    assert len(got) == len(want)
    for name, parts in got.items():  # ComfyUI's rule: alpha / rank when present (rank of a decomposed factor)
        rank = next((parts[k].shape[0] for k in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b") if k in parts), None)
        scale = parts["alpha"].item() / rank if "alpha" in parts and rank else 1.0
        comp, module = ("unet", name[len("lora_unet_"):]) if name.startswith("lora_unet_") \
            else ("text_encoder", name[len("lora_te_"):])
        match = [k for k in want if k.startswith(comp + ".") and k.split(".", 1)[1].replace(".", "_") == module]
        assert len(match) == 1
        torch.testing.assert_close(lycoris_delta(parts, scale), want[match[0]])
    with safe_open(str(out), "pt") as fh:
        assert json.loads(fh.metadata()["ss_network_args"]) == {"algo": kind}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_own_loader_reads_the_export_to_the_picture_generate_draws(runs, tiny_path, tmp_path, kind,
                                                                          demo_subject, caplog):
    """LyCORIS's own kohya-format loader (lycoris-lora) merges the exported file into plain diffusers: the picture
    `boothkit generate` draws from the run. LoHa at alpha = rank: lycoris-lora 3.4.0 scales a LoHa by (alpha/rank)²
    (its get_weight and get_diff_weight each apply it), where A1111, ComfyUI and peft apply alpha/rank once."""
    from lycoris import kohya

    run = runs[kind] if kind == "lokr" else run_training(make_cfg(demo_subject, tmp_path / "run", adapter=kind,
                                                                  alpha=4.0), progress=False)
    out = tmp_path / "k.safetensors"
    with caplog.at_level("WARNING", logger="boothkit"):
        E.export(E.export_config(lora=str(runs["loha"]), format="kohya", out=str(tmp_path / "scaled.safetensors")))
        assert "LoHa with alpha 8 != rank 4" in caplog.text  # the file LyCORIS's loader would read otherwise
        caplog.clear()
        E.export(E.export_config(lora=str(run), format="kohya", out=str(out)))
    assert "(alpha/rank)²" not in caplog.text
    plain, state = plain_pipe(tiny_path), load_file(str(out))
    te = plain.text_encoder
    if not hasattr(te, "text_model"):  # transformers 5 dropped the level the kohya names (lora_te_text_model_...) keep
        te = torch.nn.Module()
        te.text_model = plain.text_encoder
    net, _ = kohya.create_network_from_weights(1.0, None, plain.vae, te, plain.unet, weights_sd=state)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len(grouped(state))  # every module found its layer
    net.merge_to(te, plain.unet, state, torch.float32, "cpu")
    mine = picture(G.load_generation_pipeline(None, [(str(run), 1.0)]))
    assert np.abs(mine - picture(plain_pipe(tiny_path))).max() > 0.01  # the adapter changes the picture
    assert np.abs(mine - picture(plain)).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ZERO_INIT)
def test_merged_export_draws_what_generate_draws(runs, tmp_path, kind):
    out = tmp_path / "m"
    E.export(E.export_config(lora=str(runs[kind]), format="merged", out=str(out), unet_scale=U, text_encoder_scale=T))
    assert np.abs(picture(plain_pipe(out)) - ours(runs[kind])).max() < 1e-4


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_dora_kohya_exports_refuse_in_one_line(runs, tmp_path, fmt):
    kind, out = "dora", tmp_path / "x.safetensors"
    with pytest.raises(BoothkitError, match=f"--format {fmt}") as err:
        E.export(E.export_config(lora=str(runs[kind]), format=fmt, out=str(out)))
    assert kind in str(err.value) and "\n" not in str(err.value) and not out.exists()


def test_diffusers_export_keeps_the_file(runs, tmp_path):
    out = tmp_path / "d.safetensors"
    E.export(E.export_config(lora=str(runs["dora"]), format="diffusers", out=str(out)))
    a, b = load_file(str(runs["dora"] / LORA_FILE)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("over,keys", [({"adapter": "dora", "method": "ti"}, ("lora.adapter", "lora.method")),
                                       ({"adapter": "lokr", "full": True}, ("lora.adapter", "lora.full"))])
def test_adapter_without_adapters_to_train_is_refused(instance_dir, tmp_path, over, keys):
    with pytest.raises(ConfigError) as err:
        C.validate_train(make_cfg(instance_dir, tmp_path / "out", **over))
    assert all(k in str(err.value) for k in keys) and "\n" not in str(err.value)
