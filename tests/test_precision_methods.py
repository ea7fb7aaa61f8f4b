"""Every method trains at bf16 (what --mixed-precision auto picks on a CPU with bf16 instructions; emulated, only
slower, elsewhere): LoRA, DoRA, LoKr, LoHa, Textual Inversion, pivotal and the full fine-tune, each 2 steps on tiny.
What each writes is fp32, finite and moved off its starting point, and loads back, in fp32, to what plain diffusers
draws. fp16, which a CPU cannot run, is refused in one line before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.generate import generation as G
from boothkit.adapters.embeddings import EMBEDDINGS_FILE, Placeholder, add_placeholder, train_rows
from boothkit.core.errors import ConfigError
from boothkit.adapters.lora import LORA_FILE
from boothkit.models.loading import load_pipeline
from boothkit.train.loop import run_training

TOKEN = "[ktn]"
PROMPT = "a photo of [ktn] dog"
# name -> overrides; between them: every method, with and without the text encoder, with and without the prior
RUNS = {
    "lora": dict(adapter="lora", train_text_encoder=True),
    "dora": dict(adapter="dora", train_text_encoder=True),
    "lokr": dict(adapter="lokr", train_text_encoder=True, prior=False),
    "loha": dict(adapter="loha", prior=False),
    "ti": dict(method="ti"),
    "pivotal": dict(method="pivotal", prior=False),
    "pivotal-te": dict(method="pivotal", train_text_encoder=True),
    "full": dict(method="full", train_text_encoder=True),
}
ZERO_INIT = {"lora": "lora_B", "dora": "lora_B", "lokr": "lokr_w1", "loha": "hada_w2_b"}  # the factor peft starts at 0


def make_cfg(instance_dir, out, **over):
    values = {"instance_dir": str(instance_dir), "token": TOKEN, "class_noun": "dog", "output_dir": str(out),
              "max_steps": 2, "prior": True, "num_class_images": 1, "class_steps": 2, "rank": 4, "alpha": 4.0,
              "learning_rate": 1e-2, "text_encoder_lr": 1e-2, "ti_lr": 5e-2, "mixed_precision": "bf16"}
    return C.resolve(C.TRAIN_SECTIONS, {}, {**values, **over})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_subject, one_thread):
    """name -> its run's output folder, trained on first use (a method that fails to train fails its own tests)."""
    root, done = tmp_path_factory.mktemp("bf16"), {}

    def run(name: str):
        if name not in done:  # one class folder for all: the class image is made once, by the frozen model at bf16
            cfg = make_cfg(demo_subject, root / name, class_dir=str(root / "class"), overwrite=True, **RUNS[name])
            done[name] = run_training(cfg, progress=False)
        return done[name]
    return run


def picture(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.fixture(scope="module")
def base_picture(tiny_path, one_thread) -> np.ndarray:
    return picture(load_pipeline(str(tiny_path)))


def fp32_finite(tensors: dict) -> bool:
    return all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in tensors.values())


def test_a_trained_embedding_row_hands_its_lookup_on_in_the_encoders_precision(tiny_path, one_thread):
    """The cause of "mixed dtype (CPU): expect parameter to have scalar type of Float": the fp32 table of a bf16
    text encoder fed fp32 into its bf16 LayerNorm, which a CPU refuses even under autocast."""
    pipe = load_pipeline(str(tiny_path), dtype=torch.bfloat16)
    encoder = pipe.text_encoder
    ids = add_placeholder(pipe.tokenizer, encoder, Placeholder(TOKEN, 2), "dog")
    weight = train_rows(encoder, ids)
    assert weight.dtype == torch.float32 and weight.requires_grad  # the master weights
    tokens = pipe.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(tokens)[0]
        assert encoder.get_input_embeddings()(tokens).dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    moved = (weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert moved == sorted(ids[:1])  # the prompt's one placeholder row (not its second vector, not the rest)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_each_method_trains_at_bf16(runs, name, tiny_path):
    out = runs(name)
    assert C.load_toml(out / "config.toml")["train"]["mixed_precision"] == "bf16"  # it ran in bf16, not fp32
    if name == "full":
        base = load_file(tiny_path / "unet" / "diffusion_pytorch_model.safetensors")
        for part in ("unet/diffusion_pytorch_model", "text_encoder/model"):
            trained = load_file(out / "model" / f"{part}.safetensors")
            assert fp32_finite(trained)
        trained = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
        assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 1e-4
        return
    if name in ("ti", "pivotal", "pivotal-te"):
        learned = load_file(out / EMBEDDINGS_FILE)
        assert fp32_finite(learned)
        pipe = load_pipeline(str(tiny_path))
        table = pipe.text_encoder.get_input_embeddings().weight
        start = table[pipe.tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
        assert (learned[TOKEN] - start).abs().max() > 1e-3  # moved off the class noun it started at
    if name == "ti":
        assert not (out / LORA_FILE).exists()
        return
    tensors = load_file(out / LORA_FILE)
    assert fp32_finite(tensors)
    factor = ZERO_INIT[RUNS[name].get("adapter", "lora")]
    for comp in ("unet", "text_encoder") if RUNS[name].get("train_text_encoder") else ("unet",):
        moved = [v for k, v in tensors.items() if k.startswith(comp + ".") and factor in k]
        assert moved and all(v.abs().max() > 0 for v in moved)  # the adapter's update left 0 in every layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora", "ti", "pivotal", "pivotal-te", "full"])
def test_bf16_outputs_draw_in_fp32_what_plain_diffusers_draws(runs, name, tiny_path, base_picture):
    out = runs(name)
    if name == "full":
        from diffusers import StableDiffusionPipeline

        plain = StableDiffusionPipeline.from_pretrained(str(out / "model"), safety_checker=None,
                                                        requires_safety_checker=False)
        plain.set_progress_bar_config(disable=True)
        drawn = picture(plain)
        assert np.isfinite(drawn).all() and np.abs(drawn - base_picture).max() > 1e-3
        return
    plain = load_pipeline(str(tiny_path))
    if name in ("ti", "pivotal", "pivotal-te"):
        plain.load_textual_inversion(str(out / EMBEDDINGS_FILE))
    if name != "ti":
        plain.load_lora_weights(str(out))
    ours = G.load_generation_pipeline(None, [(str(out), 1.0)])
    assert ours.unet.dtype == torch.float32 and plain.unet.dtype == torch.float32
    reference = picture(plain)
    assert np.isfinite(reference).all()
    assert np.abs(picture(ours) - reference).max() < 1e-5
    assert np.abs(reference - base_picture).max() > 1e-3  # what trained shows in the picture


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lokr", "loha"])
def test_bf16_lycoris_files_load_and_change_the_picture(runs, name, base_picture):
    """Plain diffusers reads no LoKr/LoHa (tests/test_adapters.py checks boothkit's load against LyCORIS's formula)."""
    ours = picture(G.load_generation_pipeline(None, [(str(runs(name)), 1.0)]))
    assert np.isfinite(ours).all() and np.abs(ours - base_picture).max() > 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_on_a_cpu_is_refused_in_one_line_before_any_work(instance_dir, tmp_path, monkeypatch):
    from boothkit.train import loop as T

    def no_work(*_a, **_k):
        raise AssertionError("work began before the refusal")

    monkeypatch.setattr(T, "read_photos", no_work)
    monkeypatch.setattr(T, "load_pipeline", no_work)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as exc:
        run_training(make_cfg(instance_dir, out, method="pivotal", mixed_precision="fp16"), progress=False)
    assert "fp16 needs a GPU" in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()  # not even the output folder is left behind
