"""Concurrent runs: a second training into a busy output folder is refused with one line, a killed run leaves
nothing stuck, and two runs sharing a class-image folder take turns and agree on its contents."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from boothkit.core import config as C
from boothkit.train import prior
from boothkit.cli import main
from boothkit.core.errors import BoothkitError
from boothkit.core.locks import LOCK_NAME, folder_lock
from boothkit.train.loop import run_training

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _wait_for(test, proc, timeout=180):
    deadline = time.time() + timeout
    while not test():
        assert proc.poll() is None and time.time() < deadline, "the first run ended too early"
        time.sleep(0.02)


@pytest.mark.slow
def test_second_training_into_a_busy_folder_is_refused_and_a_killed_run_leaves_no_lock(instance_dir, tmp_path,
                                                                                        capsys):
    out = tmp_path / "run"
    args = ["train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--no-prior", "--rank", "2",
            "--log-every", "1", "--checkpoint-every", "1", "--output-dir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "boothkit", *args, "--max-steps", "100000"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for((out / "train_log.csv").exists, first)
        with pytest.raises(SystemExit) as exit_:
            main(args + ["--max-steps", "2", "--overwrite"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert err.strip() == (f"error: --output-dir {out}: another boothkit run (pid {first.pid}) is training in "
                               f"this folder; wait for it to end or choose another folder")
        assert first.poll() is None  # the refused run touched nothing of the running one
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_NAME).exists()  # a SIGKILL leaves the file, but not the lock: the kernel dropped it
    cfg = C.resolve(C.TRAIN_SECTIONS, {}, {"instance_dir": str(instance_dir), "class_noun": "dog", "prior": False,
                                           "rank": 2, "max_steps": 2, "output_dir": str(out), "overwrite": True})
    run_training(cfg, progress=False)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_a_refused_run_creates_no_folder(tmp_path):
    with pytest.raises(BoothkitError, match="--instance-dir"):
        run_training(C.resolve(C.TRAIN_SECTIONS, {}, {"instance_dir": str(tmp_path / "none"), "class_noun": "dog",
                                                      "output_dir": str(tmp_path / "out")}), progress=False)
    assert not (tmp_path / "out").exists()


def test_waiters_take_turns_and_the_holder_is_named(tmp_path, caplog):
    folder, order = tmp_path / "shared", []
    held, release = threading.Event(), threading.Event()

    def holder():
        with folder_lock(folder, "--class-dir", "making class images"):
            held.set()
            release.wait(30)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    with pytest.raises(BoothkitError, match=rf"^--class-dir {folder}: another boothkit run \(pid {os.getpid()}\) "):
        with folder_lock(folder, "--class-dir", "making class images"):
            pass
    threading.Timer(0.3, release.set).start()
    with caplog.at_level("INFO", logger="boothkit"), folder_lock(folder, "--class-dir", "making class images",
                                                                  wait=True):
        order.append("second")
    thread.join()
    assert order == ["first done", "second"]
    assert "waiting for another boothkit run" in caplog.text


@pytest.mark.slow
def test_two_runs_fill_one_class_folder_once(tmp_path):
    """Two `class-images` processes on the same folder at once: both succeed, each image is made once, and the
    manifest records all of them."""
    folder = tmp_path / "dogs"
    cmd = [sys.executable, "-m", "boothkit", "class-images", "--class-noun", "dog", "--class-dir", str(folder),
           "--num-class-images", "4", "--class-steps", "2", "--class-batch-size", "2"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    manifest = json.loads((folder / prior.MANIFEST).read_text())
    assert sorted(manifest["images"]) == [prior.class_image_name(i) for i in range(4)]
    made = [err.count("generating") for _, err in results]
    assert sorted(made) == [0, 1], results  # one made all four; the other waited and found them
    assert sorted(p.name for p in folder.iterdir()) == sorted([prior.MANIFEST] + list(manifest["images"]))
