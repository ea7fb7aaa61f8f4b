"""The Gradio UI: forms built from the configs, handlers that give the CLI's RunConfig and run the real stages,
and the run queue under one root (queued, watched, cancelled, resumed, found again after a restart)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from boothkit import cli, ui  # noqa: E402
from boothkit.core import config as C  # noqa: E402
from boothkit.generate import generation as G  # noqa: E402
from boothkit import adapters as L  # noqa: E402
from boothkit.ui import runs as R  # noqa: E402
from boothkit.train.data import load_image  # noqa: E402
from boothkit.export.formats import EXPORT_SECTIONS  # noqa: E402
from boothkit.evaluate.metrics import EVALUATE_SECTIONS  # noqa: E402
from boothkit.evaluate.sweep import SWEEP_SECTIONS  # noqa: E402
from boothkit.evaluate import demo as D  # noqa: E402
from boothkit.ui import forms as F  # noqa: E402
from processes import kill_at, paused_python  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
QUICK = next(name for name, preset in ui.PRESETS.items() if preset["model"] == "tiny")  # the quick-test preset


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


@pytest.fixture
def queue(tmp_path):
    q = R.RunQueue(tmp_path / "runs")
    yield q
    q.close()


@pytest.fixture
def finished_run(queue, lora, demo_subject) -> str:
    """A run folder as training leaves it: the LoRA and config.toml (no training: the LoRA fixture's weights)."""
    folder = queue.folder("sks-dog-done")
    folder.mkdir()
    shutil.copy(lora, folder / L.LORA_FILE)
    C.save_toml(folder / "config.toml", C.resolve(C.TRAIN_SECTIONS, {}, {
        "instance_dir": str(demo_subject), "class_noun": "dog", "output_dir": str(folder)}).to_dict())
    return "sks-dog-done"


def form(sections, **changes):
    values = ui.form_defaults(sections)
    assert set(changes) <= set(values) | {"photos", "run_name"}
    values.update(changes)
    return values


def train_form(**changes):
    """The train form under the quick-test preset (the tiny model), with `changes`."""
    values = ui.preset_values(QUICK, {})
    assert set(changes) <= set(values) | {"photos", "run_name"}
    return {**values, **changes}


def cli_config(monkeypatch, module: str, function: str, argv: list[str], returns=None) -> C.RunConfig:
    """The RunConfig `boothkit <argv>` hands to its stage function (stubbed to record it)."""
    seen = []
    monkeypatch.setattr(f"boothkit.{module}.{function}", lambda cfg: seen.append(cfg) or returns)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    return seen[0]


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


# ------------------------------------------------------------------------------------------- forms

def test_build_ui_has_a_field_for_every_option_at_its_default(tmp_path):
    app = ui.build_ui(tmp_path / "runs")
    comps = {b.elem_id: b for b in app.blocks.values() if isinstance(b, gr.components.Component) and b.elem_id}
    forms = {  # elem_id prefix: (sections, what the form shows first, fields the run sets instead)
        "train": (C.TRAIN_SECTIONS, ui.preset_values(ui.DEFAULT_PRESET, {}), ui.TRAIN_BY_RUN),
        "gen": (C.GENERATE_SECTIONS, ui.form_defaults(C.GENERATE_SECTIONS), F.GENERATE_BY_RUN),
        "sweep": (SWEEP_SECTIONS, ui.form_defaults(SWEEP_SECTIONS), F.GENERATE_BY_RUN),
        "eval": (EVALUATE_SECTIONS, ui.form_defaults(EVALUATE_SECTIONS), F.EVALUATE_BY_RUN),
        "export": (EXPORT_SECTIONS, ui.form_defaults(EXPORT_SECTIONS), ()),
    }
    for prefix, (sections, shown, by_run) in forms.items():
        for cls in sections.values():
            for f in dataclasses.fields(cls):
                comp = comps.get(f"{prefix}-{f.name.replace('_', '-')}")
                if f.name in by_run:  # the run's folder, its LoRA, its photos: never typed
                    assert comp is None, (prefix, f.name)
                    continue
                assert comp is not None, f"no {prefix} field for {f.name}"
                assert comp.label == f.name.replace("_", " ") and comp.info.startswith(f.metadata["help"])
                assert comp.value == shown[f.name], (prefix, f.name)
    assert [v for _, v in comps["gen-scheduler"].choices] == ["", *C.SCHEDULERS]
    # LoRA scales are sliders starting at the one default scale, the CLI's and the demo's too (issue 31)
    assert all(isinstance(comps[f"gen-{k}"], gr.Slider) for k in ("unet-scale", "text-encoder-scale"))
    # guidance left empty is the model family's own (7.5 SD, 3.5 FLUX.1's distilled guidance)
    assert isinstance(comps["gen-guidance"], gr.Number) and comps["gen-guidance"].value in (None, "")
    assert comps["gen-unet-scale"].value == comps["gen-text-encoder-scale"].value == C.LORA_SCALE == 0.8
    assert C.GenerateConfig().unet_scale == C.GenerateConfig().text_encoder_scale == C.LORA_SCALE
    assert SWEEP_SECTIONS["sweep"]().unet_scale == "0.8" and D.UNET_SCALE == D.TEXT_ENCODER_SCALE == C.LORA_SCALE
    # the page opens on the mini preset: a pretrained model that learns a subject on a CPU (tiny draws noise)
    assert ui.DEFAULT_PRESET == next(iter(ui.PRESETS)) and comps["train-model"].value == "mini"
    assert comps["train-max-steps"].value == C.model_preset("mini")["train"]["max_steps"]


def test_train_form_gives_the_cli_config(monkeypatch, tmp_path):
    # gr.Number hands back floats; tuples are one item per line; "" is an unset optional field.
    values = form(C.TRAIN_SECTIONS, model="tiny", instance_dir="photos", class_noun="dog", token="zwx", max_steps=3.0, rank=4,
                  learning_rate=0.001, prior=False, train_text_encoder=True,
                  validation_prompts="a photo of {token}\n\n  {token} on the moon ", lr_scheduler="cosine",
                  instance_prompt="", model_config="")
    argv = ["train", "--model", "tiny", "--instance-dir", "photos", "--class-noun", "dog", "--token", "zwx", "--output-dir",
            str(tmp_path), "--max-steps", "3", "--rank", "4", "--learning-rate", "0.001", "--no-prior",
            "--train-text-encoder", "--validation-prompts", "a photo of {token}", "--validation-prompts",
            "{token} on the moon", "--lr-scheduler", "cosine"]
    got = ui.train_config(values, tmp_path)
    assert got == cli_config(monkeypatch, "train.loop", "run_training", argv, tmp_path)
    assert got.train.validation_prompts == ("a photo of {token}", "{token} on the moon")
    assert got.data.instance_prompt is None and got.train.max_steps == 3 and type(got.train.max_steps) is int
    # Uploaded photos replace the folder field with a folder under the run folder.
    up = ui.train_config({**values, "photos": ["a.jpg"]}, tmp_path)
    assert up == got.replace("data", instance_dir=str(tmp_path / ui.UPLOAD_DIR))


def test_generate_form_gives_the_cli_config(monkeypatch, tmp_path):
    values = form(C.GENERATE_SECTIONS, lora="a\nb:0.5", prompt="p one\np two", num_images=2.0, guidance=5,
                  unet_scale=0.8, scheduler="euler-a", out=str(tmp_path))
    argv = ["generate", "--lora", "a", "--lora", "b:0.5", "--prompt", "p one", "--prompt", "p two", "-n", "2",
            "--guidance", "5", "--unet-scale", "0.8", "--scheduler", "euler-a", "--text-encoder-scale", "0.8",
            "--out", str(tmp_path)]
    assert ui.resolve_form(C.GENERATE_SECTIONS, values) == cli_config(monkeypatch, "generate.generation", "run_generate", argv, [])
    default_sampler = ui.resolve_form(C.GENERATE_SECTIONS, {**values, "scheduler": ""})
    assert default_sampler.generate.scheduler is None and default_sampler.generate.model is None


def test_presets_fill_the_form_and_keep_the_subject(tmp_path):
    typed = {"token": "zwx", "class_noun": "cat", "instance_dir": "my/photos", "max_steps": 7, "rank": 32}
    for name, preset in ui.PRESETS.items():
        values = ui.preset_values(name, typed)
        cfg = ui.train_config(values, tmp_path / "run")  # every preset is a valid `boothkit train` config
        assert (cfg.data.token, cfg.data.class_noun, cfg.data.instance_dir) == ("zwx", "cat", "my/photos")
        assert cfg.train.max_steps == preset["max_steps"] and cfg.lora.rank == preset["rank"]  # typed values reset
        assert cfg.model.model == preset["model"]
    assert ui.preset_values("SDXL LoRA (GPU)", typed)["resolution"] == 1024
    with pytest.raises(C.ConfigError, match="preset 'nope'"):
        ui.preset_values("nope", typed)


@pytest.mark.parametrize("change, key", [
    ({"max_steps": 0}, "train.max_steps"),
    ({"model": ""}, "model.model is required"),  # a cleared model field: no silent default
    ({"rank": 2.5}, "lora.rank"),
    ({"max_steps": None}, "train.max_steps"),  # a cleared number field
    ({"class_noun": ""}, "data.class_noun"),
    ({"instance_dir": ""}, "data.instance_dir"),
    ({"run_name": "../escape"}, "run name"),
])
def test_train_bad_value_is_a_gr_error_naming_the_key(queue, change, key):
    values = train_form(**{"instance_dir": "x", "class_noun": "dog", **change})
    with pytest.raises(gr.Error, match=key.replace(".", r"\.")):
        ui.start_training(queue, values)
    assert [p for p in queue.root.iterdir() if p.is_dir()] == []  # nothing written for a rejected form


def test_photos_are_shown_upright_and_bad_files_named(tmp_path, demo_subject):
    # A phone portrait: pixels stored landscape (120x80), EXIF orientation 6 turns it upright (80x120).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 80), "red").save(tmp_path / "portrait.jpg", exif=exif)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "small.png")
    thumbs, notes = ui.inspect_photos([str(tmp_path / n) for n in ("portrait.jpg", "broken.jpg", "small.png")])
    assert [(name, img.size) for img, name in thumbs] == [("portrait.jpg", (80, 120)), ("small.png", (30, 30))]
    lines = notes.splitlines()
    assert lines[0].startswith("- **broken.jpg**: not a readable image") and str(tmp_path) not in notes
    assert lines[1] == "- **small.png**: only 30x30 pixels; it will look blurry"
    assert lines[2] == "- 2 readable photos; DreamBooth works best with 3-5"
    ok, notes = ui.inspect_photos([str(p) for p in sorted(demo_subject.glob("*.jpg"))])
    assert len(ok) == 5 and notes == "" and max(ok[0][0].size) == 192


def test_a_bad_photo_is_refused_before_queueing(queue, tmp_path, demo_subject):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    photos = [str(p) for p in sorted(demo_subject.glob("*.jpg"))[:2]] + [str(tmp_path / "broken.jpg")]
    with pytest.raises(gr.Error, match=r"broken\.jpg: not a readable image .*--skip-bad-images"):
        ui.start_training(queue, train_form(photos=photos, class_noun="dog", run_name="bad"))
    assert not queue.folder("bad").exists() and queue.runs() == []


# ----------------------------------------------------------------------------------------- training

@pytest.mark.slow
def test_train_run_is_watched_to_the_end_and_found_again(queue, demo_subject, monkeypatch):
    photos = [str(p) for p in sorted(demo_subject.glob("*.jpg"))[:3]]
    values = train_form(photos=photos, token="sksqwzt", class_noun="dog", max_steps=4, prior=True,
                        num_class_images=2, class_steps=2, validate_every=2, validation_steps=1,
                        validation_prompts="a photo of {token}", checkpoint_every=0, run_name="first")
    name, said = ui.start_training(queue, values)
    assert (name, said) == ("first", "starting")
    status = queue.wait(name)
    assert status["state"] == "done" and status["message"].startswith("4 steps in"), status
    view = ui.run_view(queue, name)
    assert 'data-state="done" data-step="4" data-total="4"' in view["status"]
    loss = view["loss"].dropna()  # every step, each curve: the plot's table
    assert sorted(loss.groupby("curve")["step"].apply(list).items()) == [
        ("prior", [1, 2, 3, 4]), ("subject", [1, 2, 3, 4]), ("total", [1, 2, 3, 4])]
    total = loss[loss.curve == "total"]["loss"].to_numpy()
    parts = loss[loss.curve == "subject"]["loss"].to_numpy() + loss[loss.curve == "prior"]["loss"].to_numpy()
    np.testing.assert_allclose(total, parts, rtol=1e-4)  # prior weight 1: total = subject + prior
    assert [caption for _, caption in view["validation"]] == ["step 4", "step 2"]
    assert Image.open(view["validation"][0][0]).size == (128, 64)  # 1 prompt x 2 seeds at 64 px
    assert view["weights"] == str(queue.folder(name) / L.LORA_FILE) and L.read_lora_info(view["weights"])["steps"] == "4"
    assert "warning: identifier 'sksqwzt' splits into 4 tokens" in view["log"]  # the library's warning reaches the page
    assert C.load_toml(queue.folder(name) / "config.toml")["train"]["log_every"] == 1  # a live plot
    assert 'max_steps = 4' in view["config"] and (view["cancel"], view["resume"]) == (False, False)
    copied = sorted((queue.folder(name) / ui.UPLOAD_DIR).iterdir())
    # re-encoded: the upright pixels training reads, as PNG, no EXIF carried over
    assert [p.name for p in copied] == [f"{i:03d}-{Path(p).stem}.png" for i, p in enumerate(photos)]
    for stored, original in zip(copied, photos):
        with Image.open(stored) as img:
            assert img.format == "PNG" and not img.getexif()
            assert np.array_equal(np.asarray(img), np.asarray(load_image(original)))
    # A second run of that name is refused as a message, and leaves the first as it was.
    with pytest.raises(gr.Error, match="run name first: a run of that name exists"):
        ui.start_training(queue, values)
    # One server per root; a restarted one (a new queue over the root) lists the run with everything it showed.
    with pytest.raises(C.ConfigError, match="another boothkit ui is serving these runs"):
        R.RunQueue(queue.root)
    queue.close()
    again = R.RunQueue(queue.root)
    try:
        assert [n for n, _ in again.runs()] == ["first"]
        view2 = ui.run_view(again, "first")
        assert view2["status"] == view["status"] and view2["validation"] == view["validation"]
        assert view2["loss"].equals(view["loss"])
    finally:
        again.close()


@pytest.mark.slow
def test_second_run_waits_cancel_stops_at_a_checkpoint_and_resume_finishes(queue, instance_dir):
    base = dict(instance_dir=str(instance_dir), class_noun="dog", prior=False, validate_every=0, rank=2)
    ui.start_training(queue, train_form(**base, max_steps=120, checkpoint_every=100, run_name="long"))
    _, said = ui.start_training(queue, train_form(**base, max_steps=2, checkpoint_every=0, run_name="next"))
    _, said3 = ui.start_training(queue, train_form(**base, max_steps=2, checkpoint_every=0, run_name="third"))
    assert (said, said3) == ("queued: 1 run ahead", "queued: 2 runs ahead")
    assert queue.progress("next").state == "queued" and queue.progress("next").message == "1 run ahead"
    assert queue.cancel("third") == "cancelled before it started"
    wait_for(lambda: queue.progress("long").step >= 2, what="two steps of the long run")
    assert queue.cancel("long") == "stopping after the current step"
    stopped = queue.wait("long")
    assert stopped["state"] == "cancelled" and "checkpoint written to" in stopped["message"], stopped
    step = queue.progress("long").step
    assert 2 <= step < 120 and (queue.folder("long") / "checkpoints" / f"step-{step:07d}").is_dir()
    view = ui.run_view(queue, "long")
    assert view["resume"] and not view["cancel"] and view["weights"] is None
    assert queue.wait("next")["state"] == "done"  # the queue went on to the next run
    assert queue.status("third")["state"] == "cancelled" and not (queue.folder("third") / "config.toml").exists()
    # Resume continues from the checkpoint to the end; the log holds every step once.
    assert queue.resume("long") == "starting"
    assert queue.wait("long")["state"] == "done"
    assert [int(r["step"]) for r in R.read_log(queue.folder("long"))] == list(range(1, 121))
    with pytest.raises(C.ConfigError, match="run long is finished"):
        queue.resume("long")
    with pytest.raises(C.ConfigError, match="run next is not queued or running"):
        queue.cancel("next")


def test_restart_marks_runs_of_a_stopped_server_stopped_and_resumable(tmp_path, instance_dir):
    root = tmp_path / "runs"
    folder = root / "was-running"
    (folder / "checkpoints" / "step-0000003").mkdir(parents=True)
    (folder / "checkpoints" / "step-0000003" / "state.json").write_text("{}")
    cfg = ui.train_config(train_form(instance_dir=str(instance_dir), class_noun="dog"), folder)
    C.save_toml(folder / R.REQUEST, cfg.to_dict())
    (folder / R.STATUS).write_text(json.dumps({"state": "running", "server": "gone", "created": 1.0, "max_steps": 40}))
    (root / "cli-run").mkdir()  # a `boothkit train --output-dir ROOT/cli-run` made outside the UI
    C.save_toml(root / "cli-run" / "config.toml", cfg.replace("train", output_dir=str(root / "cli-run")).to_dict())
    (root / "not-a-run").mkdir()
    queue = R.RunQueue(root)
    try:
        runs = dict(queue.runs())
        assert set(runs) == {"was-running", "cli-run"}
        assert runs["was-running"]["state"] == "stopped"
        assert runs["was-running"]["message"] == ("the server stopped during this run; Resume continues it from its "
                                                  "newest checkpoint")
        assert runs["cli-run"]["state"] == "unfinished" and ui.run_view(queue, "cli-run")["resume"] is False
        assert ui.run_view(queue, "was-running")["resume"] is True
    finally:
        queue.close()


def test_eta_comes_from_the_pace_of_logged_steps(queue):
    folder = queue.folder("paced")
    folder.mkdir()
    (folder / R.STATUS).write_text(json.dumps({"state": "running", "server": queue.server, "max_steps": 20}))

    def log_until(step: int, when: float) -> None:
        rows = "".join(f"{s},1.0,0.5,0.5,0.0001,\n" for s in range(1, step + 1))
        (folder / "train_log.csv").write_text("step,loss,instance_loss,prior_loss,lr,text_encoder_lr\n" + rows)
        os.utime(folder / "train_log.csv", (when, when))

    log_until(2, 1000.0)
    first = queue.progress("paced")
    assert (first.step, first.total, first.eta) == (2, 20, None)  # one sighting: no pace yet
    log_until(6, 1002.0)  # 4 steps in 2 s
    p = queue.progress("paced")
    assert (p.step, p.seconds_per_step, p.eta) == (6, 0.5, 7.0)
    html = ui.progress_html(p)
    assert '<progress value="6" max="20"' in html and "running · step 6/20 · 0.50 s/step · ETA 0:07" in html


# ------------------------------------------------------------------------------ generate, sweep, report

@pytest.mark.slow
def test_generate_handler_writes_the_cli_images(queue, finished_run, lora, tmp_path):
    values = {k: v for k, v in form(C.GENERATE_SECTIONS, prompt="a photo of sks dog", num_images=2, steps=2,
                                    seed=5).items() if k not in F.GENERATE_BY_RUN}
    *_, (gallery, files) = ui.generate(queue, finished_run, values)
    out = queue.folder(finished_run) / "samples" / "001"
    assert len(files) == 2 and all(Path(p).parent == out for p in files)
    assert [caption for _, caption in gallery] == [Path(p).stem for p in files]
    direct = G.run_generate(C.resolve(C.GENERATE_SECTIONS, {}, {
        "lora": [str(lora)], "prompt": ["a photo of sks dog"], "num_images": 2, "steps": 2, "seed": 5,
        "unet_scale": 0.8, "text_encoder_scale": 0.8, "out": str(tmp_path / "cli")}))
    for a, b in zip(files, direct, strict=True):
        assert Image.open(a).size == (64, 64)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    params = G.parse_parameters(Image.open(files[0]).text["parameters"])  # downloadable with its parameters
    assert (params["prompt"], params["UNet scale"], params["TE scale"], params["Seed"]) == ("a photo of sks dog", "0.8",
                                                                                          "0.8", "5")
    *_, (_, again) = ui.generate(queue, finished_run, values)  # each generation keeps its own folder
    assert Path(again[0]).parent.name == "002"
    assert ui.run_defaults(queue, finished_run) == {"prompt": "a photo of sks dog", "clip_model": "tiny",
                                                    "dino_model": "tiny"}


@pytest.mark.slow
def test_sweep_and_report_views_run_the_cli_stages(queue, finished_run, lpips_weights):
    values = {k: v for k, v in form(SWEEP_SECTIONS, prompt="a photo of sks dog", guidance="2,7.5", unet_scale="0.8",
                                    text_encoder_scale="0.8", num_images=1, steps=1).items()
              if k not in F.GENERATE_BY_RUN}
    *_, sheets = ui.sweep(queue, finished_run, values)
    sweep_dir = queue.folder(finished_run) / "sweeps" / "001"
    assert [caption for _, caption in sheets] == ["sheet-p00-a-photo-of-sks-dog"]
    assert len(list(sweep_dir.glob("cells/*/*/*.png"))) == 2 and Image.open(sheets[0][0]).width > 2 * 64
    with pytest.raises(gr.Error, match=r"evaluate\.samples: generate pictures first"):
        next(ui.evaluate(queue, finished_run, None, None, {}))
    gen = {k: v for k, v in form(C.GENERATE_SECTIONS, prompt="a photo of sks dog", num_images=2, steps=1).items()
           if k not in F.GENERATE_BY_RUN}
    list(ui.generate(queue, finished_run, gen))
    metrics = {k: v for k, v in form(EVALUATE_SECTIONS, clip_model="tiny", dino_model="tiny").items()
               if k not in F.EVALUATE_BY_RUN}
    *_, (frame, report) = ui.evaluate(queue, finished_run, "001", "", metrics)
    assert report == str(queue.folder(finished_run) / "reports" / "001" / "report.html")
    assert frame.startswith('<iframe id="bk-report"') and "boothkit evaluation" in frame
    assert json.loads((Path(report).parent / "metrics.json").read_text())["overall"]["DINO"] is not None


def test_generate_and_export_errors_are_gr_errors(queue, finished_run, tmp_path):
    with pytest.raises(gr.Error, match=r"generate\.prompt"):
        next(ui.generate(queue, finished_run, {"prompt": ""}))
    with pytest.raises(gr.Error, match="run: pick a finished run"):
        next(ui.generate(queue, None, {"prompt": "p"}))
    (queue.root / "unfinished").mkdir()
    with pytest.raises(gr.Error, match=r"run unfinished: no weights yet"):
        next(ui.sweep(queue, "unfinished", {"prompt": "p"}))
    with pytest.raises(gr.Error, match=r"export\.out"):
        ui.export(form(EXPORT_SECTIONS, lora="x", out=str(tmp_path / "kohya.bin")))


def test_export_handler_writes_the_file(lora, tmp_path):
    out = tmp_path / "kohya.safetensors"
    assert ui.export(form(EXPORT_SECTIONS, lora=str(lora), out=str(out))) == str(out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in fh.keys())


# ---------------------------------------------------------------------------------------------- server

def test_cli_ui_serves_the_root_it_is_given(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("boothkit.ui.launch", lambda *a, **kw: seen.append((a, kw)))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ui", "--root", str(tmp_path / "mine"), "--port", "7999"])
    assert exit_.value.code == 0 and seen == [(("127.0.0.1", 7999, False), {"root": str(tmp_path / "mine")})]


def test_app_serves_its_page_and_files_from_the_root_only(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "runs"
    (root / "r1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "r1" / "grid.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    app = ui.launch("127.0.0.1", port, False, root=root, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{url}/", timeout=30) as resp:
            assert resp.status == 200 and b"boothkit" in resp.read()
        with urllib.request.urlopen(f"{url}/gradio_api/file={root / 'r1' / 'grid.png'}", timeout=30) as resp:
            assert resp.status == 200 and resp.read().startswith(b"\x89PNG")
        for outside in (tmp_path / "outside.png", Path(__file__)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}/gradio_api/file={outside}", timeout=30)
            assert refused.value.code in (403, 404)
        assert app.max_file_size == 50 * 1024 ** 2  # uploads over the limit are refused by the server
        boundary = "x" * 16
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * (51 * 1024 ** 2) + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{url}/gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
    finally:
        app.close()


# --------------------------------------------------------------------- what a new run replaces, and when

def _earlier_attempt(queue, name: str, photos: list[Path]) -> dict[str, bytes]:
    """A failed earlier run `name`: its uploaded photos, training log, UI log and validation picture."""
    folder = queue.folder(name)
    (folder / ui.UPLOAD_DIR).mkdir(parents=True)
    for i, p in enumerate(photos):
        load_image(p).save(folder / ui.UPLOAD_DIR / f"{i:03d}-{p.stem}.png")
    (folder / "train_log.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    (folder / R.LOG).write_text("the earlier attempt's log\n")
    (folder / "validation" / "step-0000002").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "validation" / "step-0000002" / "grid.png")
    (folder / R.STATUS).write_text(json.dumps({"state": "failed", "message": "earlier", "created": 1.0}))
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_upload_keeps_the_earlier_photos_and_names_the_file(queue, tmp_path, demo_subject):
    jpgs = sorted(demo_subject.glob("*.jpg"))
    before = _earlier_attempt(queue, "again", jpgs[:3])
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    photos = [str(p) for p in jpgs[3:5]] + [str(tmp_path / "broken.jpg")]
    with pytest.raises(gr.Error) as exc:
        ui.start_training(queue, train_form(photos=photos, class_noun="dog", run_name="again", overwrite=True))
    # named where the photo would have been stored, not in the temp folder it was checked in
    assert f"{queue.folder('again') / ui.UPLOAD_DIR}/002-broken.jpg: not a readable image" in str(exc.value)
    assert _files(queue.folder("again")) == before  # photos, logs and pictures as they were; no temp folder


def test_a_queued_fresh_run_replaces_the_earlier_attempt_only_when_it_starts(queue, instance_dir, demo_subject,
                                                                           monkeypatch):
    gate, started = threading.Event(), []

    def held_training(cfg, progress, stop):  # stands in for training: the queue's order is what is tested
        started.append(Path(cfg.train.output_dir).name)
        assert gate.wait(60)

    monkeypatch.setattr("boothkit.train.loop.run_training", held_training)
    base = dict(instance_dir=str(instance_dir), class_noun="dog", prior=False)
    ui.start_training(queue, train_form(**base, run_name="busy"))
    wait_for(lambda: started == ["busy"], what="the first run to start")
    before = _earlier_attempt(queue, "again", sorted(demo_subject.glob("*.jpg"))[:3])
    _, said = ui.start_training(queue, train_form(**base, run_name="again", overwrite=True))
    assert said == "queued: 1 run ahead"
    kept = {k: v for k, v in _files(queue.folder("again")).items() if k not in (R.STATUS, R.REQUEST)}
    assert kept == {k: v for k, v in before.items() if k != R.STATUS}  # nothing deleted while it waits...
    view = ui.run_view(queue, "again")  # ...and nothing of the earlier attempt shown as this run's
    assert view["loss"].dropna().empty and view["validation"] == [] and view["log"] == ""
    assert 'data-step="0"' in view["status"]
    assert queue.cancel("again") == "cancelled before it started"
    assert (queue.folder("again") / "train_log.csv").is_file() and (queue.folder("again") / R.LOG).is_file()
    assert ui.run_view(queue, "again")["validation"] != []  # cancelled: the earlier attempt's pictures show again
    ui.start_training(queue, train_form(**base, run_name="again", overwrite=True))
    gate.set()
    assert queue.wait("again")["state"] == "done" and started == ["busy", "again"]
    folder = queue.folder("again")
    assert not (folder / "train_log.csv").exists() and not (folder / "validation").exists()
    assert not (folder / R.LOG).exists()  # the stand-in logs nothing: the earlier attempt's log went at its start


@pytest.mark.slow
@pytest.mark.parametrize("at, replaced", [("boothkit.ui.handlers:_store_photos:1", False),
                                          ("boothkit.core.files:fsync_tree:1", False),
                                          ("boothkit.core.files:_exchange:1", True)])
def test_an_upload_killed_midway_leaves_the_earlier_photos_or_the_new_ones_whole(tmp_path, demo_subject, at,
                                                                                 replaced):
    jpgs = sorted(demo_subject.glob("*.jpg"))
    folder = tmp_path / ui.UPLOAD_DIR
    old = {p.name: p.read_bytes() for p in ui.copy_photos([str(p) for p in jpgs[:3]], folder).iterdir()}
    marker = tmp_path / "held"
    code = "from boothkit.ui import copy_photos\ncopy_photos(sys.argv[2:], Path(sys.argv[1]))\n"
    cmd, extra = paused_python("from pathlib import Path\n" + code, [folder, *jpgs[3:5]], at, marker)
    kill_at(cmd, marker, {**os.environ, **extra})
    now = {p.name: p.read_bytes() for p in folder.iterdir()}
    if replaced:
        assert sorted(now) == ["000-" + jpgs[3].stem + ".png", "001-" + jpgs[4].stem + ".png"]
        assert all(load_image(folder / n) for n in now)
    else:
        assert now == old
    assert ui.copy_photos([str(jpgs[0])], folder) == folder and len(list(folder.iterdir())) == 1  # the next upload
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind


@pytest.mark.parametrize("stage", ["class images", "latent caching"])
def test_cancel_while_preparing_stops_the_run_and_resume_finishes_it(queue, instance_dir, monkeypatch, stage):
    """The UI's Cancel during class images or latent caching (before any step): the run stops there, cancelled,
    keeps the class images made, and Resume trains it to the end (issue 28)."""
    from boothkit.train import batches, prior

    name, pressed = "prep", []
    where, attr = (prior, "save_png") if stage == "class images" else (batches.LatentBank, "_encode")
    real = getattr(where, attr)

    def press_cancel_once(*args, **kwargs):  # Cancel pressed while the first picture is being made or encoded
        result = real(*args, **kwargs)
        if not pressed:
            pressed.append(queue.cancel(name))
        return result

    monkeypatch.setattr(where, attr, press_cancel_once)
    ui.start_training(queue, train_form(instance_dir=str(instance_dir), class_noun="dog", prior=True,
                                        num_class_images=3, class_steps=1, class_batch_size=1, max_steps=2,
                                        checkpoint_every=0, validate_every=0, run_name=name))
    status = queue.wait(name)
    assert pressed == ["stopping after the current step"] and status["state"] == "cancelled", status
    assert f"interrupted while {'making class images' if stage == 'class images' else 'caching latents'} (1 of" \
        in status["message"], status
    made = sorted((queue.folder(name) / "class_images").glob("class-*.png"))
    assert len(made) == (1 if stage == "class images" else 3)
    monkeypatch.undo()
    # the worker writes "cancelled" a moment before it takes the next job: Resume may queue behind its finishing
    assert queue.resume(name) in ("starting", "queued: 1 run ahead") and queue.wait(name)["state"] == "done"
    assert R.weights(queue.folder(name)) is not None
    assert sorted((queue.folder(name) / "class_images").glob("class-*.png"))[:len(made)] == made


def test_stop_closes_a_sweep_between_cells_and_the_rerun_makes_only_the_rest(queue, finished_run, monkeypatch):
    """The Sweep tab's Stop: gradio closes the handler's stream (at one of its yields, which come every half
    second); the sweep ends before its next cell, the cells made stay, and the same sweep run again finishes."""
    from boothkit.evaluate import sweep as S

    real, calls, started, release = G.generate_images, [], threading.Event(), threading.Event()

    def first_cell_waits(*args, **kwargs):
        calls.append(kwargs["guidance"])
        if len(calls) == 1:
            started.set()
            assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "generate_images", first_cell_waits)
    values = {k: v for k, v in form(SWEEP_SECTIONS, prompt="a photo of sks dog", guidance="1,2,3", unet_scale="0.8",
                                    text_encoder_scale="0.8", num_images=1, steps=1).items()
              if k not in F.GENERATE_BY_RUN}
    stream = ui.sweep(queue, finished_run, values)
    while not started.is_set():  # the stream comes back every half second, while loading and while drawing...
        next(stream)
    stream.close()  # ...and Stop closes it while the first cell is being made
    release.set()
    wait_for(lambda: not any(t.name == "boothkit-stream" for t in threading.enumerate()), what="the sweep to end")
    out = queue.folder(finished_run) / "sweeps" / "001"
    assert calls == [1.0] and len(list(out.glob("cells/*/*/*.png"))) == 1  # no cell after the Stop
    [made] = out.glob("cells/*/*/*.png")
    first = made.read_bytes()
    monkeypatch.undo()
    cfg = C.load_toml(out / "sweep_config.toml")
    S.run_sweep(C.resolve(SWEEP_SECTIONS, {}, cfg["sweep"]))
    assert len(list(out.glob("cells/*/*/*.png"))) == 3 and made.read_bytes() == first  # kept, not redrawn


def test_stop_closes_an_evaluation_before_its_report(queue, finished_run, monkeypatch):
    """The Report tab's Stop: the evaluation ends at its next evaluator or prompt and writes no report."""
    from boothkit.evaluate import metrics as M

    samples = queue.folder(finished_run) / "samples" / "001"
    samples.mkdir(parents=True)
    for i in range(2):
        G.save_png(Image.new("RGB", (32, 32), (60 * i, 90, 200)), samples / f"{i:03d}-a-photo-s{i}.png",
                   "a photo of sks dog\nNegative prompt: \nSteps: 1")
    started, release = threading.Event(), threading.Event()
    real = M.Evaluators.__init__

    def evaluators_wait(self, *args, **kwargs):  # the evaluators loading when Stop is pressed
        real(self, *args, **kwargs)
        started.set()
        assert release.wait(60)

    monkeypatch.setattr(M.Evaluators, "__init__", evaluators_wait)
    metrics = {k: v for k, v in form(EVALUATE_SECTIONS, clip_model="tiny", dino_model="tiny").items()
               if k not in F.EVALUATE_BY_RUN}
    stream = ui.evaluate(queue, finished_run, "001", "", metrics)
    while not started.is_set():
        assert next(stream) is ui.handlers.UNCHANGED
    stream.close()
    release.set()
    wait_for(lambda: not any(t.name == "boothkit-stream" for t in threading.enumerate()), what="the evaluation to end")
    assert not (queue.folder(finished_run) / "reports" / "001").exists()


def test_each_stop_button_cancels_its_own_event(tmp_path):
    """Stop beside Generate, Sweep and Evaluate cancels that button's event (gradio then closes its stream, which
    stops the work: tested above at the handlers)."""
    app = ui.build_ui(tmp_path / "runs")
    try:
        cfg = app.config
        names = {c["id"]: c.get("props", {}).get("elem_id") for c in cfg["components"]}
        wired = {names[d["targets"][0][0]]: [cfg["dependencies"][i]["api_name"] for i in d["cancels"]]
                 for d in cfg["dependencies"] if d.get("cancels")}
        assert wired == {"bk-generate-stop": ["generate"], "bk-sweep-stop": ["sweep"],
                         "bk-evaluate-stop": ["evaluate"]}
    finally:
        app.boothkit_runs.close()
