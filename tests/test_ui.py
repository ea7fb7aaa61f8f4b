"""The Gradio UI: forms built from the configs, handlers that give the CLI's RunConfig and run the real stages."""
from __future__ import annotations

import dataclasses
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from boothkit import cli, config as C, generate as G, lora as L, ui  # noqa: E402
from boothkit.data import load_image  # noqa: E402
from boothkit.export import EXPORT_SECTIONS  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(tiny_path, tmp_path_factory) -> Path:
    """A boothkit LoRA for the tiny model with random nonzero B matrices on the UNet (as in test_generate)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    L.add_lora(unet, UNET_TARGETS, rank=4, alpha=4)
    g = torch.Generator().manual_seed(3)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    return L.save_lora_file(tmp_path_factory.mktemp("lora") / L.LORA_FILE, {"unet": L.lora_state_dict(unet)},
                            {"unet": L.adapter_metadata(UNET_TARGETS, 4, 4)},
                            {"base_model": str(tiny_path), "token": "sks", "class_noun": "dog"})


def form(sections, **changes):
    values = ui.form_defaults(sections)
    assert set(changes) <= set(values) | {"photos"}
    values.update(changes)
    return values


def cli_config(monkeypatch, module: str, function: str, argv: list[str], returns=None) -> C.RunConfig:
    """The RunConfig `boothkit <argv>` hands to its stage function (stubbed to record it)."""
    seen = []
    monkeypatch.setattr(f"boothkit.{module}.{function}", lambda cfg: seen.append(cfg) or returns)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    return seen[0]


# ------------------------------------------------------------------------------------------- forms

def test_build_ui_has_a_field_for_every_option_at_its_default():
    app = ui.build_ui()
    comps = [b for b in app.blocks.values() if isinstance(b, gr.components.Component)]
    for sections in (C.TRAIN_SECTIONS, C.GENERATE_SECTIONS, EXPORT_SECTIONS):
        defaults = ui.form_defaults(sections)
        for cls in sections.values():
            for f in dataclasses.fields(cls):
                matches = [c for c in comps if c.label == f.name.replace("_", " ")
                           and (getattr(c, "info", None) or "").startswith(f.metadata["help"])]
                assert matches, f"no UI field for {f.name}"
                assert any(c.value == defaults[f.name] for c in matches), f.name
    dropdown = [c for c in comps if c.label == "scheduler"][0]
    assert [v for _, v in dropdown.choices] == ["", *C.SCHEDULERS]


def test_train_form_gives_the_cli_config(monkeypatch, tmp_path):
    # gr.Number hands back floats; tuples are one item per line; "" is an unset optional field.
    values = form(C.TRAIN_SECTIONS, instance_dir="photos", class_noun="dog", token="zwx", output_dir=str(tmp_path),
                  max_steps=3.0, rank=4, learning_rate=0.001, prior=False, train_text_encoder=True,
                  validation_prompts="a photo of {token}\n\n  {token} on the moon ", lr_scheduler="cosine",
                  instance_prompt="", model_config="")
    argv = ["train", "--instance-dir", "photos", "--class-noun", "dog", "--token", "zwx", "--output-dir",
            str(tmp_path), "--max-steps", "3", "--rank", "4", "--learning-rate", "0.001", "--no-prior",
            "--train-text-encoder", "--validation-prompts", "a photo of {token}", "--validation-prompts",
            "{token} on the moon", "--lr-scheduler", "cosine"]
    got = ui.train_config(values)
    assert got == cli_config(monkeypatch, "train", "run_training", argv, tmp_path)
    assert got.train.validation_prompts == ("a photo of {token}", "{token} on the moon")
    assert got.data.instance_prompt is None and got.train.max_steps == 3 and type(got.train.max_steps) is int
    # Uploaded photos replace the folder field with a folder under the output folder.
    up = ui.train_config({**values, "photos": ["a.jpg"]})
    assert up == got.replace("data", instance_dir=str(tmp_path / ui.UPLOAD_DIR))


def test_generate_form_gives_the_cli_config(monkeypatch, tmp_path):
    values = form(C.GENERATE_SECTIONS, lora="a\nb:0.5", prompt="p one\np two", num_images=2.0, guidance=5,
                  unet_scale=0.8, scheduler="euler-a", out=str(tmp_path))
    argv = ["generate", "--lora", "a", "--lora", "b:0.5", "--prompt", "p one", "--prompt", "p two", "-n", "2",
            "--guidance", "5", "--unet-scale", "0.8", "--scheduler", "euler-a", "--out", str(tmp_path)]
    assert ui.resolve_form(C.GENERATE_SECTIONS, values) == cli_config(monkeypatch, "generate", "run_generate", argv, [])
    default_sampler = ui.resolve_form(C.GENERATE_SECTIONS, {**values, "scheduler": ""})
    assert default_sampler.generate.scheduler is None and default_sampler.generate.model is None


@pytest.mark.parametrize("change, key", [
    ({"max_steps": 0}, "train.max_steps"),
    ({"rank": 2.5}, "lora.rank"),
    ({"max_steps": None}, "train.max_steps"),  # a cleared number field
    ({"class_noun": ""}, "data.class_noun"),
    ({"output_dir": ""}, "train.output_dir"),
    ({"instance_dir": ""}, "data.instance_dir"),
])
def test_train_bad_value_is_a_gr_error_naming_the_key(tmp_path, change, key):
    values = form(C.TRAIN_SECTIONS, **{"instance_dir": "x", "class_noun": "dog", "output_dir": str(tmp_path / "o"),
                                       **change})
    with pytest.raises(gr.Error, match=key.replace(".", r"\.")):
        next(ui.train(values))
    assert not (tmp_path / "o").exists()  # nothing written for a rejected form


def test_generate_and_export_errors_are_gr_errors(tmp_path):
    with pytest.raises(gr.Error, match=r"generate\.prompt"):
        next(ui.generate(form(C.GENERATE_SECTIONS, lora="x", out=str(tmp_path))))
    with pytest.raises(gr.Error, match="--lora missing"):
        next(ui.generate(form(C.GENERATE_SECTIONS, lora="missing", prompt="p", out=str(tmp_path))))
    with pytest.raises(gr.Error, match=r"export\.out"):
        ui.export(form(EXPORT_SECTIONS, lora="x", out=str(tmp_path / "kohya.bin")))


# ----------------------------------------------------------------------------------------- running

def test_generate_handler_writes_the_cli_images(lora, tmp_path):
    values = form(C.GENERATE_SECTIONS, lora=str(lora), prompt="a photo of sks dog", num_images=2, steps=2,
                  seed=5, unet_scale=0.7, out=str(tmp_path / "ui"))
    *_, final = ui.generate(values)
    assert len(final) == 2 and all(Path(p).parent == tmp_path / "ui" for p in final)
    direct = G.run_generate(C.resolve(C.GENERATE_SECTIONS, {}, {
        "lora": [str(lora)], "prompt": ["a photo of sks dog"], "num_images": 2, "steps": 2, "seed": 5,
        "unet_scale": 0.7, "out": str(tmp_path / "cli")}))
    for a, b in zip(final, direct, strict=True):
        assert Image.open(a).size == (64, 64)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert not np.array_equal(np.asarray(Image.open(final[0])), np.asarray(Image.open(final[1])))  # seeds 5, 6


def test_export_handler_writes_the_file(lora, tmp_path):
    out = tmp_path / "kohya.safetensors"
    assert ui.export(form(EXPORT_SECTIONS, lora=str(lora), out=str(out))) == str(out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in fh.keys())


def test_train_handler_trains_on_uploaded_photos(demo_subject, tmp_path):
    photos = [str(p) for p in sorted(demo_subject.glob("*.jpg"))[:3]]
    out = tmp_path / "run"
    values = form(C.TRAIN_SECTIONS, photos=photos, token="sksqwzt", class_noun="dog", output_dir=str(out),
                  max_steps=2, prior=False, rank=2, validate_every=2, validation_steps=1,
                  validation_prompts="a photo of {token}")
    *_, (status, grid, lora_path) = ui.train(values)
    assert status.splitlines()[-1].startswith("done: 2 steps")
    assert "warning: identifier 'sksqwzt' splits into 4 tokens" in status  # the library's warning reaches the page
    assert lora_path == str(out / L.LORA_FILE) and L.read_lora_info(lora_path)["steps"] == "2"
    assert Image.open(grid).size == (128, 64)  # 1 prompt x 2 seeds at 64 px
    copied = sorted((out / ui.UPLOAD_DIR).iterdir())
    # re-encoded: the upright pixels training reads, as PNG, no EXIF carried over
    assert [p.name for p in copied] == [f"{i:03d}-{Path(p).stem}.png" for i, p in enumerate(photos)]
    for stored, original in zip(copied, photos):
        with Image.open(stored) as img:
            assert img.format == "PNG" and not img.getexif()
            assert np.array_equal(np.asarray(img), np.asarray(load_image(original)))
    saved = C.load_toml(out / "config.toml")
    assert saved["data"]["instance_dir"] == str(out / ui.UPLOAD_DIR)
    # A second run into the same folder is refused like on the CLI, as a message.
    with pytest.raises(gr.Error, match="earlier run"):
        list(ui.train(values))


def test_app_serves_its_page():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = ui.launch("127.0.0.1", port, False, prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
            assert resp.status == 200 and b"boothkit" in resp.read()
        assert app.max_file_size == 50 * 1024 ** 2  # uploads over the limit are refused by the server
        boundary = "x" * 16
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * (51 * 1024 ** 2) + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
    finally:
        app.close()
