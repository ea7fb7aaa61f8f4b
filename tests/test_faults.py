"""A full disk at each save site (issue 28): class images, checkpoint, LoRA, export, sweep. Each refuses in one line
naming the file, keeps what was written before readable, and the same command (with --resume for training) then
completes as if nothing had happened. The disk fills at a chosen file (tests/support/faults.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boothkit.adapters import LORA_FILE
from boothkit.cli import main
from boothkit.train import checkpoint as ckpt
from faults import disk_full_at

pytestmark = pytest.mark.usefixtures("one_thread")
FULL = "(No space left on device, "  # the reason and the free space, as the one line says them
KEPT = "what was written before is kept: free some space and run the command again"


def cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temps(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.name != ".boothkit.lock"]


def train_args(instance_dir, out, *more):
    return ["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--max-steps", 6, "--rank", 2,
                    "--checkpoint-every", 2, "--output-dir", out, *more]


def test_disk_full_during_class_images_keeps_the_ones_made(instance_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = train_args(instance_dir, out, "--prior", "--num-class-images", 3, "--class-steps", 1,
                      "--class-batch-size", 1)
    refused = disk_full_at(monkeypatch, r"class-00001\.png")
    code, err = cli(capsys, *args)
    assert code == 2 and refused
    assert one_line(err).startswith(f"error: {out / 'class_images' / 'class-00001.png'}: could not be written {FULL}")
    assert one_line(err).endswith(KEPT)
    made = {k: v for k, v in digests(out / "class_images").items() if k.endswith(".png")}
    assert sorted(made) == ["class-00000.png"] and no_temps(out)
    monkeypatch.undo()
    code, err = cli(capsys, *args)
    assert code == 0, err
    after = {k: v for k, v in digests(out / "class_images").items() if k.endswith(".png")}
    assert len(after) == 3 and after["class-00000.png"] == made["class-00000.png"]  # kept and counted, not redrawn


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_subject):
    out = tmp_path_factory.mktemp("full") / "run"
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in train_args(demo_subject, out, "--no-prior")])
    assert exc.value.code == 0
    return load_file(out / LORA_FILE)


@pytest.mark.parametrize("at, kept_steps", [("step-0000004", [2]), (LORA_FILE, [2, 4])])
def test_disk_full_at_a_checkpoint_or_the_lora_and_resume_ends_as_an_uninterrupted_run(
        demo_subject, uninterrupted, tmp_path, capsys, monkeypatch, at, kept_steps):
    out = tmp_path / "run"
    args = train_args(demo_subject, out, "--no-prior")
    disk_full_at(monkeypatch, at.replace(".", r"\."))
    code, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and "No space left on device" in line and str(out) in line, line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == kept_steps and not (out / LORA_FILE).exists()
    for _, path in ckpt.list_checkpoints(out):
        ckpt.load_checkpoint(path)  # whole and verified against its recorded digests
    monkeypatch.undo()
    code, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    resumed = load_file(out / LORA_FILE)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "resumed LoRA differs"
    assert no_temps(out)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, demo_subject) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["train", "--instance-dir", demo_subject, "--class-noun", "dog", "--no-prior",
                               "--max-steps", 1, "--rank", 2, "--output-dir", out]])
    assert exc.value.code == 0
    return out / LORA_FILE


@pytest.mark.parametrize("fmt, name", [("kohya", "kohya.safetensors"), ("merged", "merged")])
def test_disk_full_during_export_keeps_the_earlier_export(lora, tmp_path, capsys, monkeypatch, fmt, name):
    target = tmp_path / name
    args = ["export", "--lora", lora, "--format", fmt, "--out", target]
    assert cli(capsys, *args)[0] == 0
    before = digests(tmp_path)
    disk_full_at(monkeypatch, name.replace(".", r"\."))
    code, err = cli(capsys, *args, "--overwrite")
    assert code == 2 and one_line(err).startswith(f"error: {target}: could not be written {FULL}"), err
    assert digests(tmp_path) == before and no_temps(tmp_path)


def test_disk_full_during_a_sweep_keeps_its_cells_and_the_rerun_completes(lora, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = ["sweep", "--lora", lora, "--prompt", "a photo of sks dog", "--guidance", "1,2", "--unet-scale", "1",
            "--text-encoder-scale", "1", "--num-images", 1, "--steps", 1, "--out", out]
    disk_full_at(monkeypatch, r"/g2_u1_t1/")  # the second cell
    code, err = cli(capsys, *args)
    assert code == 2 and "g2_u1_t1" in one_line(err) and one_line(err).endswith(KEPT), err
    first = {k: v for k, v in digests(out).items() if k.endswith(".png")}
    assert [k.split("/")[-2] for k in first] == ["g1_u1_t1"] and no_temps(out)
    monkeypatch.undo()
    code, err = cli(capsys, *args)
    assert code == 0, err
    after = digests(out)
    assert all(after[k] == v for k, v in first.items()) and "sweep.csv" in after
    assert sorted(k.split("/")[-2] for k in after if k.endswith("-s0.png")) == ["g1_u1_t1", "g2_u1_t1"]


# Where a seeded loop kills a whole run (prior on: class images, latent caching, steps, checkpoints, the LoRA), as
# "module:function" and the range of its N-th return the run is held at (tests/support/processes.py).
KILL_POINTS = [("boothkit.train.prior:save_png", 1, 4), ("boothkit.train.trainer:LatentBank", 1, 1),
               ("boothkit.train.loop:_after_step", 1, 6), ("boothkit.core.files:fsync_tree", 1, 3),
               ("boothkit.core.files:_exchange", 1, 3), ("os:fsync", 1, 40)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_lora(demo_subject, tmp_path, seed):
    """SIGKILL at seeded random points of a whole run, each rerun with --resume killed again, until one finishes:
    its LoRA equals an uninterrupted run's bit for bit (the stated tolerance: none)."""
    import os
    import random

    from processes import kill_if_reached, paused

    prior = ["--prior", "--num-class-images", 4, "--class-steps", 1, "--class-batch-size", 1]
    reference = tmp_path / "reference"
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in train_args(demo_subject, reference, *prior)])
    assert exc.value.code == 0
    # the runs it is compared with at this process's thread count: other summation orders are other last bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    out, rng, killed = tmp_path / "run", random.Random(seed), []
    args = train_args(demo_subject, out, *prior)
    for round_ in range(4):
        where, low, high = rng.choice(KILL_POINTS)
        at = f"{where}:{rng.randint(low, high)}"
        cmd, extra = paused(args + ["--resume"] * bool(round_), at, tmp_path / "held")
        rc = kill_if_reached(cmd, tmp_path / "held", {**env, **extra}, tmp_path / f"round{round_}.log")
        if rc is not None:  # the run ended before that point
            assert rc == 0, (killed, at, (tmp_path / f"round{round_}.log").read_text()[-2000:])
            break
        killed.append(at)
    else:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args + ["--resume"]])
        assert exc.value.code == 0, killed
    a, b = load_file(reference / LORA_FILE), load_file(out / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at {killed}: LoRA differs"
    assert killed  # the seed killed the run at least once
    assert no_temps(out), killed
