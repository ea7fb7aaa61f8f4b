"""core.files.atomic_folder, the one folder swap (full-model save, merged export, checkpoints, built-in models): a
process killed at any moment leaves the old version or the new one, whole, never neither (SIGKILL, real processes)."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from boothkit.cli import main
from boothkit.core import files
from processes import kill_at, paused, paused_python

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
OLD = {"a.txt": "old", "b.txt": "old"}
NEW = {"a.txt": "new", "b.txt": "new", "c.txt": "new"}

# Swaps `path` from OLD to NEW and holds (marker written, then asleep until killed) at one moment of it.
SWAP = """
import os, sys, time
from pathlib import Path
import boothkit.core.files as files

path, at = Path(sys.argv[1]), sys.argv[2]

def hold():
    open(os.environ["BOOTHKIT_TEST_MARKER"], "w").close()
    time.sleep(120)

def after(module, name, calls=1):
    real, seen = getattr(module, name), []
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            hold()
        return result
    setattr(module, name, wrapped)

if at == "fsync":
    after(os, "fsync")  # the first file of the new version flushed, the rest not yet
elif at == "flushed":
    after(files, "fsync_tree")  # the new version complete on disk, not yet in place
elif at == "exchanged":
    after(files, "_exchange")  # the new version in place, the old one not yet deleted
elif at == "aside":
    files._exchange = lambda a, b: False  # a file system without an atomic exchange: two renames
    after(os, "rename")  # the old version moved aside, the new one not yet in place
with files.atomic_folder(path) as tmp:
    for i, name in enumerate(("a.txt", "b.txt", "c.txt")):
        (tmp / name).write_text("new")
        if at == "writing" and i == 0:
            hold()
"""


def version(path: Path) -> dict | None:
    return {p.name: p.read_text() for p in sorted(path.iterdir())} if path.is_dir() else None


@pytest.mark.parametrize("at, expect", [("writing", OLD), ("fsync", OLD), ("flushed", OLD), ("exchanged", NEW),
                                        ("aside", None)])
def test_a_swap_killed_at_any_moment_leaves_the_old_or_the_new_version(tmp_path, at, expect):
    path, marker = tmp_path / "model", tmp_path / "held"
    path.mkdir()
    for name, text in OLD.items():
        (path / name).write_text(text)
    kill_at([sys.executable, "-c", SWAP, str(path), at], marker, {**ENV, "BOOTHKIT_TEST_MARKER": str(marker)})
    if expect is None:  # between the two renames: the old version whole under its aside name, put back at once
        assert version(path) is None
        files.restore_folder(path)
        expect = OLD
    assert version(path) == expect
    with files.atomic_folder(path) as tmp:  # the next swap clears what the killed one left
        (tmp / "a.txt").write_text("next")
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("held", "held.log")] == ["model"]
    assert version(path) == {"a.txt": "next"}


def test_a_failed_swap_keeps_the_old_version(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_folder(path) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert version(path) == {"a.txt": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("at, expect", [("os:fsync:1", "old"), ("os:replace:1", "new")])
def test_a_file_write_killed_at_any_moment_leaves_the_old_or_the_new_file(tmp_path, at, expect):
    """atomic_write_bytes, the one writer of every single result file (recognition's results.json, the benches'
    tables, the pretraining stages' recipe.json, configs, run.json): killed with the new bytes flushed but not yet
    renamed, the old file; killed just after the rename, the new one; never a mix, never an empty file."""
    path, marker = tmp_path / "results.json", tmp_path / "held"
    path.write_text("old")
    code = "from boothkit.core.files import atomic_write_bytes\natomic_write_bytes(sys.argv[1], b'new')\n"
    cmd, extra = paused_python(code, [path], at, marker)
    kill_at(cmd, marker, {**ENV, **extra})
    assert path.read_text() == expect
    temps = sorted(tmp_path.glob(".results.json.*.tmp"))  # the unrenamed new bytes: a stale temp
    assert len(temps) == (expect == "old") and sorted(files.remove_stale_temps(tmp_path)) == temps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held", "held.log", "results.json"]


def _unet_digest(model: Path) -> str:
    load_file(model / "unet" / "diffusion_pytorch_model.safetensors")  # readable, not cut short
    assert (model / "boothkit.json").is_file() and (model / "model_index.json").is_file()
    return hashlib.sha256((model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("at, replaced", [("fsync_tree", False), ("_exchange", True)])
def test_full_fine_tune_killed_while_saving_keeps_a_whole_model(instance_dir, tmp_path, at, replaced):
    """The full fine-tune's save used to delete the old model folder before renaming the new one into place."""
    out = tmp_path / "out"
    args = ["train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--no-prior", "--full",
            "--max-steps", "1", "--output-dir", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    old = _unet_digest(out / "model")
    marker = tmp_path / "held"
    cmd, extra = paused([*args, "--overwrite", "--seed", "1"], f"boothkit.core.files:{at}:1", marker)
    kill_at(cmd, marker, {**ENV, **extra})
    assert (_unet_digest(out / "model") != old) == replaced
    with pytest.raises(SystemExit) as exc:
        main([*args, "--overwrite"])
    assert exc.value.code == 0
    assert _unet_digest(out / "model") == old  # seed 0 again: the same model, and no temp folder left beside it
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
@pytest.mark.parametrize("at, replaced", [("fsync_tree", False), ("_exchange", True)])
def test_merged_export_killed_while_replacing_keeps_a_whole_export(lora_run, tmp_path, at, replaced):
    out = tmp_path / "merged"
    args = ["export", "--lora", str(lora_run), "--format", "merged", "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    old = hashlib.sha256((out / "boothkit_export.toml").read_bytes()).hexdigest()
    marker = tmp_path / "held"
    cmd, extra = paused([*args, "--overwrite", "--unet-scale", "0.5"], f"boothkit.core.files:{at}:1", marker)
    kill_at(cmd, marker, {**ENV, **extra})
    load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert (hashlib.sha256((out / "boothkit_export.toml").read_bytes()).hexdigest() != old) == replaced
    with pytest.raises(SystemExit) as exc:
        main([*args, "--overwrite"])
    assert exc.value.code == 0
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, demo_subject) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--instance-dir", str(demo_subject), "--class-noun", "dog", "--no-prior", "--max-steps", "1",
              "--rank", "2", "--output-dir", str(out)])
    assert exc.value.code == 0
    return out
