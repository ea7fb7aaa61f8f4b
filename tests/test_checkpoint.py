"""Runs that go wrong: damaged checkpoints, checkpoints of another config, Ctrl-C, a full disk, SIGKILL during
class images and export. Each ends in one line naming the file or flag, and nothing written is lost or half-written."""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from boothkit.train import checkpoint as ckpt
from boothkit.core import config as C
from boothkit.export import formats as E
from boothkit.core import files
from boothkit.train import prior
from boothkit.cli import main
from boothkit.core.errors import BoothkitError, Interrupted
from boothkit.adapters.lora import LORA_FILE
from boothkit.train.loop import run_training
from processes import kill_at, paused, signal_at

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
Usage = collections.namedtuple("Usage", "total used free")


def make_cfg(instance_dir, out, **over):
    values = {"instance_dir": str(instance_dir), "class_noun": "dog", "output_dir": str(out), "max_steps": 6,
              "checkpoint_every": 2, "checkpoints_keep": 3, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3,
              "prior": False}
    return C.resolve(C.TRAIN_SECTIONS, {}, {**values, **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_subject):
    """A finished 6-step run with checkpoints at steps 2 and 4, and its photos."""
    root = tmp_path_factory.mktemp("trained")
    photos = root / "instance"
    photos.mkdir()
    for p in sorted(demo_subject.glob("*.jpg"))[:3]:
        shutil.copy(p, photos / p.name)
    out = run_training(make_cfg(photos, root / "out"), progress=False)
    return photos, out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the finished run to damage or resume; (photos, output folder, the run's LoRA weights)."""
    photos, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return photos, copy, load_file(out / LORA_FILE)


def step_dir(out: Path, step: int) -> Path:
    return ckpt.checkpoint_dir(out) / f"step-{step:07d}"


@pytest.mark.slow
def test_state_json_records_a_checksum_of_every_file(trained):
    state = json.loads((step_dir(trained[1], 4) / "state.json").read_text())
    assert state["step"] == 4 and set(state["files"]) == set(ckpt.FILES)
    assert all(state["files"][n] == files.file_sha256(step_dir(trained[1], 4) / n) for n in ckpt.FILES)
    photos = hashlib.sha256()  # the photos' names and bytes, not their folder
    for p in sorted(trained[0].iterdir()):
        photos.update(f"{p.name}\0{p.stat().st_size}\0".encode() + p.read_bytes())
    assert state["config"] == {
        "model": "tiny", "revision": None, "vae": None, "method": "lora", "full": False, "train_text_encoder": False,
        "adapter": "lora", "rank": 4, "alpha": 4.0, "dropout": 0.0, "unet_targets": list(C.UNET_LORA_TARGETS),
        "subjects": [["sks", "dog"]], "instance_prompts": ["a photo of {token} {class_noun}"],
        "photos": [[3, photos.hexdigest()]], "resolution": 64, "crop": "center", "flip": False, "buckets": False,
        "captions": False, "caption_dropout": 0.0, "masked_loss": False, "prior": False, "seed": 0,
        "mixed_precision": "no", "batch_size": 1, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
        "snr_gamma": None, "noise_offset": 0.0, "optimizer": "adamw", "lr_scheduler": "constant",
        "learning_rate": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 1e-2,
        "ema": "off"}


def _truncate(d: Path) -> None:
    p = d / "weights.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _flip_a_byte(d: Path) -> None:
    p = d / "optim.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _bad_json(d: Path) -> None:
    (d / "state.json").write_text('{"step": 4, "files": ')


def _garbage_without_checksums(d: Path) -> None:
    """A checkpoint from before checksums (no file list) whose optimizer file is not a torch file."""
    state = json.loads((d / "state.json").read_text())
    del state["files"]
    (d / "state.json").write_text(json.dumps(state))
    (d / "optim.pt").write_bytes(b"not a torch file")


def _missing_file(d: Path) -> None:
    (d / "rng.pt").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _bad_json, _garbage_without_checksums, _missing_file])
def test_damaged_newest_checkpoint_is_reported_and_the_one_before_used(run_copy, damage, caplog):
    photos, out, finished = run_copy
    damage(step_dir(out, 4))
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        run_training(make_cfg(photos, out, resume=True), progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint {step_dir(out, 4)} is damaged" in w and "using the one before it" in w for w in warned)
    resumed = load_file(out / LORA_FILE)  # steps 3-6 again from step 2: the same weights as the first time
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)


@pytest.mark.slow
def test_no_usable_checkpoint_is_one_line(run_copy, capsys):
    photos, out, _ = run_copy
    for step in (2, 4):
        _truncate(step_dir(out, step))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--instance-dir", str(photos), "--class-noun", "dog", "--no-prior", "--rank", "4",
              "--max-steps", "6", "--checkpoint-every", "2", "--output-dir", str(out), "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume: no usable checkpoint in {ckpt.checkpoint_dir(out)} (all 2 are damaged, "
                      f"see the warnings); pass --overwrite to start again"]
    assert "Traceback" not in err and (step_dir(out, 2) / "weights.safetensors").exists()  # nothing deleted


PRIOR = dict(prior=True, num_class_images=2, class_steps=1, class_batch_size=2, max_steps=2, checkpoint_every=1,
             ema_decay=0.9)
CHANGED_PHOTO, OTHER_MODEL = object(), object()
START_AGAIN = "; pass --overwrite instead of --resume to start again, or train into another --output-dir"


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, trained):
    """A 2-step run with prior preservation (2 class images) and an EMA, checkpointed at step 1; (photos, output)."""
    root = tmp_path_factory.mktemp("prior")
    return trained[0], run_training(make_cfg(trained[0], root / "out", **PRIOR), progress=False)


REFUSED = [  # (the run resumed, what changes, what the message names)
    ("trained", {"model": OTHER_MODEL}, "model.model: 'tiny' in the checkpoint, '"),
    ("trained", {"method": "pivotal"}, "lora.method: 'lora' in the checkpoint, 'pivotal' now (--method)"),
    ("trained", {"adapter": "dora"}, "lora.adapter: 'lora' in the checkpoint, 'dora' now (--adapter)"),
    ("trained", {"rank": 8}, "lora.rank: 4 in the checkpoint, 8 now (--rank)"),
    ("trained", {"train_text_encoder": True},
     "lora.train_text_encoder: False in the checkpoint, True now (--train-text-encoder/--no-train-text-encoder)"),
    ("trained", {"instance_dir": CHANGED_PHOTO},
     r"data.instance_dir: 3 photos sha256:[0-9a-f]{12} in the checkpoint, 3 photos sha256:[0-9a-f]{12} now "
     r"\(--instance-dir\)"),
    ("trained", {"token": "zwx"}, "data.token: 'sks' in the checkpoint, 'zwx' now (--token)"),
    ("trained", {"class_noun": "cat"}, "data.class_noun: 'dog' in the checkpoint, 'cat' now (--class-noun)"),
    ("trained", {"instance_prompt": "an image of {token} {class_noun}"},
     "data.instance_prompt: 'a photo of {token} {class_noun}' in the checkpoint, 'an image of {token} {class_noun}' "
     "now (--instance-prompt)"),
    ("trained", {"resolution": 128}, "data.resolution: 64 in the checkpoint, 128 now (--resolution)"),
    ("trained", {"crop": "random"}, "data.crop: 'center' in the checkpoint, 'random' now (--crop)"),
    ("trained", {"buckets": True}, "data.buckets: False in the checkpoint, True now (--buckets/--no-buckets)"),
    ("trained", {"flip": True}, "data.flip: False in the checkpoint, True now (--flip/--no-flip)"),
    ("trained", {"ema_decay": 0.9}, "train.ema_decay: 'off' in the checkpoint, 'on' now (--ema-decay)"),
    ("trained", {"mixed_precision": "bf16"},
     "train.mixed_precision: 'no' in the checkpoint, 'bf16' now (--mixed-precision)"),
    ("trained", {"seed": 1}, "train.seed: 0 in the checkpoint, 1 now (--seed)"),
    ("trained", {"learning_rate": 5e-4}, "train.learning_rate: 0.001 in the checkpoint, 0.0005 now (--learning-rate)"),
    ("trained", {"rank": 8, "seed": 1}, ("lora.rank: 4 in the checkpoint, 8 now (--rank)",
                                         "train.seed: 0 in the checkpoint, 1 now (--seed)")),
    ("prior_run", {"prior": False}, "prior.prior: True in the checkpoint, False now (--prior/--no-prior)"),
    ("prior_run", {"prior_weight": 0.5}, "prior.prior_weight: 1.0 in the checkpoint, 0.5 now (--prior-weight)"),
    ("prior_run", {"prior_target": "frozen"},
     "prior.prior_target: 'images' in the checkpoint, 'frozen' now (--prior-target)"),
    ("prior_run", {"class_prompt": "a picture of {class_noun}", "class_dir": "other-class-images"},  # not compared
     "prior.class_prompt: 'a photo of {class_noun}' in the checkpoint, 'a picture of {class_noun}' now "
     "(--class-prompt)"),
    ("prior_run", {"num_class_images": 3}, "prior.num_class_images: 2 in the checkpoint, 3 now (--num-class-images)"),
    ("prior_run", {"ema_decay": 0.99}, "train.ema_decay: 0.9 in the checkpoint, 0.99 now (--ema-decay)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("base, over, why", [pytest.param(*case, id="-".join([case[0], *case[1]])) for case in REFUSED])
def test_checkpoint_of_another_config_is_refused_naming_each_difference(request, tmp_path, tiny_path, demo_subject,
                                                                        base, over, why):
    """A resume that changes what the weights depend on is one line naming each changed key, its flag, both
    values, and how to start again; the setting changed alongside it (an identifier in the default prompt, a class
    folder) is not named."""
    photos, run = request.getfixturevalue(base)
    out = tmp_path / "run"
    shutil.copytree(run, out)
    over = {**(PRIOR if base == "prior_run" else {}), **over}
    if over.get("model") is OTHER_MODEL:  # the same weights in another folder: another model as far as a run knows
        shutil.copytree(tiny_path, tmp_path / "other")
        over["model"] = str(tmp_path / "other")
    if over.get("instance_dir") is CHANGED_PHOTO:  # one photo replaced by another of the same name
        shutil.copytree(photos, tmp_path / "photos")
        shutil.copy(sorted(demo_subject.glob("*.jpg"))[3], tmp_path / "photos" / sorted(photos.iterdir())[0].name)
        photos, over = tmp_path / "photos", {k: v for k, v in over.items() if k != "instance_dir"}
    if "class_dir" in over:
        over["class_dir"] = str(tmp_path / over["class_dir"])
    step = ckpt.list_checkpoints(out)[-1][1]
    with pytest.raises(BoothkitError) as exc:
        run_training(make_cfg(photos, out, resume=True, **over), progress=False)
    msg, whys = str(exc.value), why if isinstance(why, tuple) else (why,)
    assert msg.startswith(f"--resume: checkpoint {step} does not match this config (") and "\n" not in msg
    assert msg.endswith(")" + START_AGAIN) and msg.count(" in the checkpoint, ") == len(whys), msg
    for w in whys:
        assert re.search(w if "sha256" in w else re.escape(w), msg), msg
    if len(whys) == 2:
        assert msg == f"--resume: checkpoint {step} does not match this config ({whys[0]}; {whys[1]}){START_AGAIN}"


@pytest.mark.slow
def test_resume_with_the_photos_in_another_folder_and_more_steps(run_copy, tmp_path):
    """Not compared: where the photos are (the same photos, moved), how often logs and checkpoints are written, the
    latent cache, and max_steps: a resume with more steps extends the run."""
    photos, out, finished = run_copy
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved)
    run_training(make_cfg(moved, out, resume=True, checkpoint_every=3, checkpoints_keep=1, log_every=5,
                          cache_latents=False), progress=False)
    resumed = load_file(out / LORA_FILE)  # steps 5-6 again from step 4, the photos read from their new folder
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)
    run_training(make_cfg(moved, out, resume=True, max_steps=8), progress=False)  # from step 4 on to step 8
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 9))


FIRST_KEYS = ("model", "full", "train_text_encoder", "rank", "unet_targets")  # what the first checkpoints recorded


@pytest.mark.slow
def test_checkpoint_from_before_the_later_keys_still_resumes(run_copy):
    """Checkpoints recorded before a key was are not compared on it; one without the adapter key was a LoRA's."""
    photos, out, weights = run_copy
    for step in (2, 4):
        state = json.loads((step_dir(out, step) / "state.json").read_text())
        state["config"] = {k: v for k, v in state["config"].items() if k in FIRST_KEYS}
        (step_dir(out, step) / "state.json").write_text(json.dumps(state))
    with pytest.raises(BoothkitError, match=r"\(lora.adapter: 'lora' in the checkpoint, 'dora' now \(--adapter\)\);"):
        run_training(make_cfg(photos, out, resume=True, adapter="dora"), progress=False)
    with pytest.raises(BoothkitError, match=r"\(lora.rank: 4 in the checkpoint, 8 now \(--rank\)\);"):
        run_training(make_cfg(photos, out, resume=True, rank=8), progress=False)
    run_training(make_cfg(photos, out, resume=True, resolution=128, seed=1, learning_rate=5e-4, token="zwx"),
                 progress=False)  # none of these is compared: it resumes


@pytest.mark.slow
@pytest.mark.parametrize("over, why", [
    ({"rank": 8}, r"unet\..*lora_A.* has shape \(4, \d+\), not \(8, \d+\)"),
    ({"train_text_encoder": True}, r"missing text_encoder\."),
])
def test_checkpoint_without_a_config_record_is_compared_by_its_weights(run_copy, over, why):
    """Checkpoints written before they recorded their config: the tensors themselves must match."""
    photos, out, _ = run_copy
    for step in (2, 4):
        state = json.loads((step_dir(out, step) / "state.json").read_text())
        del state["config"], state["files"]
        (step_dir(out, step) / "state.json").write_text(json.dumps(state))
    with pytest.raises(BoothkitError, match=r"does not match this config \(" + why):
        run_training(make_cfg(photos, out, resume=True, **over), progress=False)


STEPS, HELD = 12, 5  # HELD: the step after which the signal arrives (off the checkpoint cadence)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_checkpoints_the_current_step_and_resume_is_bit_identical(instance_dir, tmp_path, sig):
    """A real SIGINT (or a scheduler's SIGTERM): the run finishes its step, checkpoints it (off the
    --checkpoint-every cadence), exits 130 with one line, and --resume ends where an uninterrupted run ends. The run
    holds after step HELD until the signal has arrived, so it lands there on a machine of any speed."""
    args = ["--instance-dir", instance_dir, "--class-noun", "dog", "--no-prior", "--max-steps", STEPS,
            "--checkpoint-every", 50, "--rank", 4, "--alpha", 4, "--learning-rate", 1e-3, "--dropout", 0.1,
            "--flip", "--log-every", 1]
    full = run_training(make_cfg(instance_dir, tmp_path / "full", max_steps=STEPS, checkpoint_every=50, dropout=0.1,
                                 flip=True, log_every=1), progress=False)
    out, log, marker = tmp_path / "stopped", tmp_path / "stopped.log", tmp_path / "held"
    train = ["train", *args, "--output-dir", out]
    cmd, extra = paused(train, f"boothkit.train.loop:_after_step:{HELD}", marker)  # held after step HELD until signalled
    rc = signal_at(cmd, marker, {**ENV, **extra}, sig, log=log)
    err = log.read_text()
    assert rc == 130, err
    kept = ckpt.list_checkpoints(out)
    assert [s for s, _ in kept] == [HELD], err
    step, path = kept[0]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: interrupted after step {step} of {STEPS}: checkpoint written to {path}; run the same command with "
        f"--resume to continue"]
    assert "Traceback" not in err and not (out / LORA_FILE).exists()
    resumed = subprocess.run([sys.executable, "-m", "boothkit", *map(str, train), "--resume"], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(full / LORA_FILE), load_file(out / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("stage, at", [
    ("latent caching", "boothkit.train.trainer:LatentBank:1"),  # the photos' latents made, the class ones not yet
    ("class images", "boothkit.train.prior:save_png:2"),  # two of four class images written
])
def test_ctrl_c_before_the_first_step_exits_130_and_the_rerun_completes(instance_dir, tmp_path, stage, at):
    """Issue 28: Ctrl-C in a stage before training (held there until the signal lands): one line, exit 130, no
    weights written, class images already made kept; the same command with --resume then trains to the end."""
    out, log, marker = tmp_path / "run", tmp_path / "run.log", tmp_path / "held"
    train = ["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--max-steps", 2, "--num-class-images", 4,
             "--class-dir", tmp_path / "class", "--class-steps", 2, "--class-batch-size", 1, "--output-dir", out]
    cmd, extra = paused(train, at, marker)
    rc = signal_at(cmd, marker, {**ENV, **extra}, signal.SIGINT, log=log)
    err = log.read_text()
    assert rc == 130 and [line for line in err.splitlines() if line.startswith("error:")] == ["error: interrupted"], err
    assert "Traceback" not in err and not (out / LORA_FILE).exists()
    made = sorted(p.name for p in (tmp_path / "class").glob("class-*.png"))
    assert made == ([f"class-{i:05d}.png" for i in range(4)] if stage == "latent caching" else
                    ["class-00000.png", "class-00001.png"])
    resumed = subprocess.run([sys.executable, "-m", "boothkit", *map(str, train), "--resume"], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / LORA_FILE).is_file() and len(list((tmp_path / "class").glob("class-*.png"))) == 4


@pytest.mark.slow
def test_ctrl_c_during_evaluation_exits_130_and_writes_no_report(tmp_path, lpips_weights):
    """Issue 28: `boothkit evaluate` interrupted once its evaluators are loaded: one line, exit 130, no report."""
    for kind in ("samples", "real"):
        (tmp_path / kind).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / kind / f"{i}.png")
    log, marker, out = tmp_path / "eval.log", tmp_path / "held", tmp_path / "e"
    cmd, extra = paused(["evaluate", "--samples", tmp_path / "samples", "--real-dir", tmp_path / "real", "--prompt",
                         "x", "--out", out, "--clip-model", "tiny", "--dino-model", "tiny"],
                        "boothkit.evaluate.metrics:Evaluators:1", marker)
    rc = signal_at(cmd, marker, {**ENV, **extra}, signal.SIGINT, log=log)
    err = log.read_text()
    assert rc == 130 and err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.slow
def test_a_stop_event_ends_the_run_like_ctrl_c(instance_dir, tmp_path, monkeypatch):
    """The UI's Cancel: an event set from another thread stops the run after the current step, checkpointed; set
    before training, it stops the run while its latents are cached."""
    import threading

    from boothkit.train import loop

    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match=r"^interrupted while caching latents \(0 of 3 pictures encoded\)"):
        run_training(make_cfg(instance_dir, tmp_path / "early"), progress=False, stop=stop)
    stop.clear()
    real = loop._after_step

    def cancel_during_step_1(*args, **kwargs):  # Cancel pressed while step 1 runs
        stop.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_after_step", cancel_during_step_1)
    with pytest.raises(Interrupted, match=r"^interrupted after step 1 of 6: checkpoint written to .*step-0000001"):
        run_training(make_cfg(instance_dir, tmp_path / "out"), progress=False, stop=stop)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "out")] == [1]


# ------------------------------------------------------------------------------------------ disk space

def _disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free + 1, 9 * free, free))


def test_class_images_check_the_disk_first(monkeypatch, tmp_path):
    _disk(monkeypatch, 100_000)
    # never asked for an image: the check comes first (the class name is all its family needs)
    pipe = type("StableDiffusionPipeline", (), {"vae_scale_factor": 8})()
    with pytest.raises(BoothkitError, match=r"^--class-dir: 10 class images of 512x512: needs about 8\.0 MB in "
                                            r".*, but only 100\.0 kB is free there"):
        prior.ensure_class_images(pipe, tmp_path / "cls", prompt="a dog", num_images=10, batch_size=2, seed=0,
                                  steps=2, guidance=7.5, resolution=512, model_name="tiny", progress=False)
    assert not (tmp_path / "cls").exists()  # made for the run, removed again: nothing was written


@pytest.mark.slow
def test_training_checks_room_for_its_weights_and_a_checkpoint(monkeypatch, instance_dir, tmp_path):
    _disk(monkeypatch, 1000)
    with pytest.raises(BoothkitError, match=r"^--output-dir: the trained weights and a checkpoint: needs about "
                                            r"[\d.]+ MB in .*, but only 1\.0 kB is free"):
        run_training(make_cfg(instance_dir, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoint_checks_the_disk_and_a_failed_write_keeps_the_earlier_ones(monkeypatch, tmp_path):
    weight = torch.nn.Parameter(torch.ones(1000))
    opt = torch.optim.AdamW([weight])
    weight.grad = torch.ones(1000)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 1, {"w": weight}, opt, sched, keep=2)
    with monkeypatch.context() as m:
        _disk(m, 5000)  # weights, AdamW's two moments and 1 MiB for the rest
        with pytest.raises(BoothkitError, match=r"^checkpoint .*step-0000002: needs about 1\.1 MB"):
            ckpt.save_checkpoint(tmp_path, 2, {"w": weight}, opt, sched, keep=2)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BoothkitError, match=r"step-0000002: could not be written \(No space left on device\); "
                                            r"the earlier checkpoints are kept"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": weight}, opt, sched, keep=2)
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == ["step-0000001"]
    assert ckpt.load_checkpoint(step_dir(tmp_path, 1))["step"] == 1


def test_pruning_keeps_the_checkpoint_just_written_beside_a_later_damaged_one(tmp_path):
    """keep 1, a damaged step 4 left by the run a resume went past, step 3 written: step 3 stays (issue 31)."""
    weight = torch.nn.Parameter(torch.ones(10))
    opt = torch.optim.AdamW([weight])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, {"w": weight}, opt, sched, keep=3)
    (step_dir(tmp_path, 4) / "weights.safetensors").write_bytes(b"damaged")
    written = ckpt.save_checkpoint(tmp_path, 3, {"w": weight}, opt, sched, keep=1)
    assert written.is_dir() and ckpt.load_checkpoint(written)["step"] == 3
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]  # step 2 pruned; 4 replaced when reached


@pytest.fixture(scope="module")
def lora(trained):
    return trained[1] / LORA_FILE


@pytest.mark.parametrize("fmt, name", [("kohya", "k.safetensors"), ("merged", "merged")])
def test_export_checks_the_disk_first(monkeypatch, lora, tmp_path, fmt, name):
    _disk(monkeypatch, 2000)
    with pytest.raises(BoothkitError, match=rf"^--out {tmp_path / name}: needs about [\d.]+ [kM]B in .*, but only "
                                            r"2\.0 kB is free"):
        E.export(E.export_config(lora=str(lora), format=fmt, out=str(tmp_path / name)))
    assert not list(tmp_path.iterdir())


def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".class-00001.png.99999999.abcd_123.tmp"
    live = tmp_path / f".class-00002.png.{os.getppid()}.abcd_123.tmp"
    users = [tmp_path / ".notes.123.txt", tmp_path / "class-00003.png"]
    for p in (dead, live, *users):
        p.write_bytes(b"x")
    assert files.remove_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, *users))


# ---------------------------------------------------------------------------------------------- SIGKILL

def _complete_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.load()
    return True


@pytest.mark.slow
def test_sigkill_during_class_images_then_rerun_completes(tmp_path):
    folder = tmp_path / "cls"
    args = ["class-images", "--class-dir", str(folder), "--class-noun", "dog", "--num-class-images", "6",
            "--class-batch-size", "1", "--class-steps", "2", "--resolution", "64"]
    marker = tmp_path / "held"
    cmd, extra = paused(args, "boothkit.train.prior:save_png:2", marker)  # killed once the second picture is saved
    kill_at(cmd, marker, {**ENV, **extra})
    made = sorted(folder.glob("class-*.png"))
    assert len(made) == 2 and all(_complete_png(p) for p in made)  # whole images or none
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([prior.MANIFEST] + [prior.class_image_name(i) for i in range(6)])  # no temp files left
    assert all(_complete_png(folder / n) for n in names if n.endswith(".png"))
    manifest = json.loads((folder / prior.MANIFEST).read_text())
    assert [manifest["images"][prior.class_image_name(i)]["seed"] for i in range(6)] == list(range(6))


# A real SIGKILL at a chosen moment: the first safetensors file (or fsync of a single file) of the export is
# written, then the process waits to be killed, so the kill always lands mid-export.
PAUSED = """
import os, sys, time
import safetensors.torch as st

def paused(real):
    def write(*args, **kwargs):
        result = real(*args, **kwargs)
        open(os.environ["BOOTHKIT_TEST_MARKER"], "w").close()
        time.sleep(120)
        return result
    return write

st.save_file = paused(st.save_file)
os.fsync = paused(os.fsync)
from boothkit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt, name", [("merged", "merged"), ("kohya", "k.safetensors")])
def test_sigkill_during_export_then_rerun_completes(lora, tmp_path, fmt, name):
    out, marker = tmp_path / "exports" / name, tmp_path / "marker"
    out.parent.mkdir()
    args = ["export", "--lora", str(lora), "--format", fmt, "--out", str(out)]
    kill_at([sys.executable, "-c", PAUSED, *args], marker, {**ENV, "BOOTHKIT_TEST_MARKER": str(marker)})
    left = list(out.parent.iterdir())
    assert not out.exists() and len(left) == 1 and left[0].name.endswith(".tmp")  # only a hidden temp
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    assert [p.name for p in out.parent.iterdir()] == [name]  # the killed run's temp is gone
    if fmt == "kohya":
        assert load_file(out)
    else:
        assert (out / "model_index.json").is_file() and (out / "boothkit_export.toml").is_file()


@pytest.mark.slow
def test_overwrite_removes_the_old_run_only_once_the_new_one_has_a_checkpoint(trained, tmp_path):
    """issue 31: --overwrite used to delete the earlier run's checkpoints before set-up, so a refusal destroyed them."""
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    before = [s for s, _ in ckpt.list_checkpoints(run)]
    assert before == [2, 4]
    with pytest.raises(BoothkitError, match="--resolution 60: must be a multiple of 8"):  # refused in set-up
        run_training(make_cfg(trained[0], run, overwrite=True, resolution=60), progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == before and (run / LORA_FILE).is_file()
    run_training(make_cfg(trained[0], run, overwrite=True, max_steps=3, checkpoint_every=1, checkpoints_keep=1),
                 progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]  # this run's, at keep 1: the old 2 and 4 are gone
