"""--method ti (Textual Inversion) and pivotal (embeddings + LoRA): what trains, the files written, and that plain
diffusers and `boothkit generate` load them back to the same pictures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.generate import generation as G
from boothkit.adapters.embeddings import EMBEDDINGS_FILE
from boothkit.core.errors import ConfigError
from boothkit.adapters.lora import LORA_FILE
from boothkit.models.loading import load_pipeline
from boothkit.train.loop import run_training

TOKEN = "[ktn]"
PROMPT = "a photo of [ktn] dog"


def make_cfg(instance_dir, out, **over):
    values = {"instance_dir": str(instance_dir), "token": TOKEN, "class_noun": "dog", "output_dir": str(out),
              "max_steps": 6, "prior": False, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "ti_lr": 5e-2}
    return C.resolve(C.TRAIN_SECTIONS, {}, {**values, **over})


def picture(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, demo_subject, one_thread):
    root = tmp_path_factory.mktemp("ti")
    return run_training(make_cfg(demo_subject, root / "run", method="ti", ti_vectors=2), progress=False)


@pytest.mark.slow
def test_ti_learns_only_the_identifiers_rows(ti_run, tiny_path):
    assert not (ti_run / LORA_FILE).exists()  # the model itself is untouched: nothing else to save
    learned = load_file(ti_run / EMBEDDINGS_FILE)[TOKEN]
    assert learned.shape == (2, 64)  # tiny's text encoder width
    base = load_pipeline(str(tiny_path))
    table = base.text_encoder.get_input_embeddings().weight
    start = table[base.tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    assert (learned - start).abs().max() > 1e-3  # training moved the vectors away from the class noun
    pipe = load_pipeline(str(tiny_path))
    pipe.load_textual_inversion(str(ti_run / EMBEDDINGS_FILE))
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    after = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(after[: table.shape[0]], table) and torch.equal(after[ids], learned)


@pytest.mark.slow
def test_ti_files_load_in_plain_diffusers_and_generate_to_the_same_picture(ti_run, tiny_path, tmp_path):
    plain = load_pipeline(str(tiny_path))
    plain.load_textual_inversion(str(ti_run / EMBEDDINGS_FILE))
    a1111 = load_pipeline(str(tiny_path))  # A1111/ComfyUI's file: {"emb_params": [N, dim]}, named by the caller
    with safe_open(str(ti_run / "embeddings" / "ktn.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["emb_params"] and fh.metadata()["boothkit.token"] == TOKEN
    a1111.load_textual_inversion(str(ti_run / "embeddings" / "ktn.safetensors"), token=TOKEN)
    ours = G.load_generation_pipeline(None, [(str(ti_run), 1.0)])
    reference = picture(plain)
    assert np.array_equal(picture(a1111), reference) and np.array_equal(picture(ours), reference)
    assert not np.array_equal(picture(load_pipeline(str(tiny_path))), reference)  # the identifier does something


@pytest.mark.slow
def test_pivotal_saves_embeddings_and_lora_that_load_together(demo_subject, tiny_path, tmp_path, one_thread):
    run = run_training(make_cfg(demo_subject, tmp_path / "run", method="pivotal", train_text_encoder=True),
                       progress=False)
    assert (run / LORA_FILE).is_file() and (run / EMBEDDINGS_FILE).is_file()
    plain = load_pipeline(str(tiny_path))
    plain.load_textual_inversion(str(run / EMBEDDINGS_FILE))
    plain.load_lora_weights(str(run))
    ours = G.load_generation_pipeline(None, [(str(run), 1.0)])
    assert np.abs(picture(ours) - picture(plain)).max() < 1e-5
    no_lora = load_pipeline(str(tiny_path))
    no_lora.load_textual_inversion(str(run / EMBEDDINGS_FILE))
    assert np.abs(picture(no_lora) - picture(plain)).max() > 1e-3  # the LoRA trained too


@pytest.mark.parametrize("over, match", [
    ({"full": True, "method": "ti"}, "lora.full conflicts with lora.method ti"),
    ({"method": "ti", "train_text_encoder": True}, "--train-text-encoder needs --method pivotal"),
])
def test_contradictions_are_named(instance_dir, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        run_training(make_cfg(instance_dir, tmp_path / "o", **over), progress=False)


def test_method_full_is_the_full_flag(instance_dir, tmp_path):
    cfg = C.validate_train(make_cfg(instance_dir, tmp_path / "o", method="full"))
    assert cfg.lora.full and cfg.lora.method == "full"
    assert C.validate_train(make_cfg(instance_dir, tmp_path / "o", full=True)).lora.method == "full"
