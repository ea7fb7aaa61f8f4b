"""Class images: count, determinism, reuse on rerun, user and corrupt files, settings guard, manifest."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit import cli
from boothkit.core import config as C
from boothkit.models import loading as models
from boothkit.generate.generation import parse_parameters
from boothkit.train import prior
from boothkit.core.errors import BoothkitError, ConfigError

SETTINGS = dict(prompt="a photo of dog", num_images=6, batch_size=4, seed=10, steps=2, guidance=7.5,
                resolution=64, model_name="tiny", progress=False)



pytestmark = pytest.mark.usefixtures("one_thread")

def counting(pipe):
    """The real pipeline, counting how many images it is asked for (still its own class to boothkit)."""
    real = type(pipe) if not hasattr(type(pipe), "counts") else type(pipe).__mro__[1]

    class Counting(real):
        counts = True

        def __call__(self, prompt, **kw):
            self.images += len(prompt)
            return super().__call__(prompt=prompt, **kw)

    pipe.__class__, pipe.images = Counting, 0
    return pipe


@pytest.fixture(scope="module")
def base(tiny_path):
    pipe = models.load_pipeline(str(tiny_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(base):
    return counting(base)


@pytest.fixture(scope="module")
def made(base, tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A folder of 6 generated class images (batches of 4) and their pixels."""
    folder = tmp_path_factory.mktemp("made") / "class"
    paths = prior.ensure_class_images(base, folder, **SETTINGS)
    return folder, [pixels(p) for p in paths]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_generates_the_count_deterministically(made, pipe, tmp_path):
    folder, first = made
    assert sorted(p.name for p in folder.glob("*.png")) == [f"class-{i:05d}.png" for i in range(6)]
    # Same seed in another folder, other batch size: identical pixels (image i depends on seed + i only).
    paths = prior.ensure_class_images(pipe, tmp_path / "again", **{**SETTINGS, "batch_size": 1})
    assert pipe.images == 6 and [p.name for p in paths] == [f"class-{i:05d}.png" for i in range(6)]
    assert all(int(np.abs(pixels(p) - a).max()) <= 1 for p, a in zip(paths, first))
    # ...and plain diffusers repeats image 3 from seed 13.
    img = super(type(pipe), pipe).__call__("a photo of dog", num_inference_steps=2, guidance_scale=7.5, height=64,
                                           width=64, generator=torch.Generator("cpu").manual_seed(13)).images[0]
    assert int(np.abs(np.asarray(img, dtype=np.int16) - first[3]).max()) <= 1


def test_manifest_records_the_settings(made, base):
    folder, _ = made
    manifest = json.loads((folder / prior.MANIFEST).read_text())
    assert (manifest["model"], manifest["prompt"], manifest["resolution"]) == ("tiny", "a photo of dog", 64)
    assert sorted(manifest["images"]) == [f"class-{i:05d}.png" for i in range(6)]
    assert manifest["images"]["class-00004.png"] == {"seed": 14, "steps": 2, "guidance": 7.5, "scheduler": "DDIM"}
    assert not list(folder.glob(".*"))  # no temp files left
    with Image.open(folder / "class-00004.png") as im:  # each picture says how it was made, as generate's do
        p = parse_parameters(im.text["parameters"])
    assert (p["prompt"], p["Seed"], p["Steps"], p["CFG scale"], p["Sampler"], p["Model"], p["Size"]) == \
        ("a photo of dog", "14", "2", "7.5", "DDIM", "tiny", "64x64")


def test_class_images_with_another_sampler(base, tmp_path):
    """--class-scheduler: the images are plain diffusers' with that sampler; the pipeline keeps its own."""
    from boothkit.generate.generation import make_scheduler

    own = base.scheduler
    paths = prior.ensure_class_images(base, tmp_path / "c", **{**SETTINGS, "num_images": 2, "steps": 3},
                                      scheduler="dpm++2m-karras")
    assert base.scheduler is own
    manifest = json.loads((tmp_path / "c" / prior.MANIFEST).read_text())
    assert {r["scheduler"] for r in manifest["images"].values()} == {"DPM++ 2M Karras"}
    base.scheduler = make_scheduler("dpm++2m-karras", own.config)
    try:
        img = base("a photo of dog", num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                   generator=torch.Generator("cpu").manual_seed(11)).images[0]
    finally:
        base.scheduler = own
    assert int(np.abs(np.asarray(img, dtype=np.int16) - pixels(paths[1])).max()) <= 1
    assert C.PriorConfig().class_scheduler == "auto" and C.PriorConfig().class_steps == 20  # the defaults


def test_rerun_generates_only_the_missing_images(made, pipe, tmp_path):
    folder = copy_folder(made[0], tmp_path / "class")
    assert prior.ensure_class_images(pipe, folder, **SETTINGS) and pipe.images == 0
    (folder / "class-00001.png").unlink()
    (folder / "class-00004.png").unlink()
    paths = prior.ensure_class_images(pipe, folder, **SETTINGS)
    assert pipe.images == 2 and len(paths) == 6
    assert all(int(np.abs(pixels(p) - a).max()) <= 1 for p, a in zip(paths, made[1]))  # the same pictures again
    # Asking for more adds the next indices; asking for fewer uses the first ones.
    assert [p.name for p in prior.ensure_class_images(pipe, folder, **{**SETTINGS, "num_images": 3})] == \
           ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert pipe.images == 2


def test_user_images_are_accepted(pipe, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("dog1.jpg", "dog2.png", "dog3.webp", "dog4.png"):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / name)
    paths = prior.ensure_class_images(pipe, folder, **SETTINGS)
    assert pipe.images == 2
    assert [p.name for p in paths] == ["class-00000.png", "class-00001.png", "dog1.jpg", "dog2.png", "dog3.webp",
                                       "dog4.png"]
    paths = prior.ensure_class_images(pipe, folder, **{**SETTINGS, "num_images": 3})
    assert pipe.images == 2 and len(paths) == 3


def test_corrupt_files_are_ignored_and_replaced(made, pipe, tmp_path, caplog):
    folder = copy_folder(made[0], tmp_path / "class")
    (folder / "class-00002.png").write_bytes((folder / "class-00002.png").read_bytes()[:200])  # killed mid-copy
    (folder / "junk.png").write_bytes(b"this is no image")
    (folder / ".class-00005.png.99999999.x1y2abcd.tmp").write_bytes(b"half")  # a killed boothkit write (dead pid)
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        paths = prior.ensure_class_images(pipe, folder, **SETTINGS)
    assert pipe.images == 1
    assert [p.name for p in paths] == [f"class-{i:05d}.png" for i in range(6)]
    assert int(np.abs(pixels(folder / "class-00002.png") - made[1][2]).max()) <= 1
    assert "junk.png" in caplog.text and "class-00002.png" in caplog.text
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("change", [{"prompt": "a photo of cat"}, {"model_name": "other"}, {"resolution": 32}])
def test_refuses_to_mix_classes(made, pipe, tmp_path, change):
    folder = copy_folder(made[0], tmp_path / "class")
    key = {"model_name": "model"}.get(next(iter(change)), next(iter(change)))
    with pytest.raises(BoothkitError, match=f"--class-dir {folder}: holds class images made with {key} ") as exc:
        prior.ensure_class_images(pipe, folder, **{**SETTINGS, **change})
    assert "\n" not in str(exc.value) and "another --class-dir" in str(exc.value)
    assert pipe.images == 0
    # Once boothkit's own images are gone, the folder is free for the new settings.
    for p in folder.glob("class-*.png"):
        p.unlink()
    paths = prior.ensure_class_images(pipe, folder, **{**SETTINGS, **change, "num_images": 1, "steps": 1})
    assert len(paths) == 1 and json.loads((folder / prior.MANIFEST).read_text())["images"].keys() == {paths[0].name}


def test_run_class_images_from_config(tiny_path, tmp_path, capsys):
    flags = {"model": str(tiny_path), "instance_dir": str(tmp_path), "class_noun": "dog", "num_class_images": 2,
             "class_steps": 1, "class_dir": str(tmp_path / "class")}
    paths = prior.run_class_images(C.resolve(C.CLASS_IMAGES_SECTIONS, {}, flags))
    assert len(paths) == 2
    manifest = json.loads((tmp_path / "class" / prior.MANIFEST).read_text())
    # the tiny model's folder and the name 'tiny' are one model: recorded as 'tiny' either way
    assert (manifest["prompt"], manifest["resolution"], manifest["model"]) == ("a photo of dog", 64, "tiny")
    assert len(prior.run_class_images(C.resolve(C.CLASS_IMAGES_SECTIONS, {}, {**flags, "model": "tiny"}))) == 2
    with pytest.raises(BoothkitError, match="made with prompt 'a photo of dog', not 'a photo of cat'"):
        prior.run_class_images(C.resolve(C.CLASS_IMAGES_SECTIONS, {}, {**flags, "class_noun": "cat"}))
    with pytest.raises(ConfigError, match="--class-dir"):
        prior.run_class_images(C.resolve(C.CLASS_IMAGES_SECTIONS, {}, {**flags, "class_dir": None}))
    with pytest.raises(SystemExit) as exc:
        cli.main(["class-images", "--model", str(tiny_path), "--instance-dir", str(tmp_path), "--class-noun", "dog"])
    assert exc.value.code == 2 and "error: prior.class_dir is required" in capsys.readouterr().err


def test_a_stop_event_ends_class_images_after_the_batch_and_keeps_them(base, tmp_path):
    """The UI's Cancel while class images are made: the current batch is written, then one line; a rerun reuses."""
    import threading

    from boothkit.core.errors import Interrupted

    stop = threading.Event()
    stop.set()
    folder = tmp_path / "c"
    with pytest.raises(Interrupted, match=r"^interrupted while making class images \(2 of 4 made in "):
        prior.ensure_class_images(base, folder, **{**SETTINGS, "num_images": 4, "batch_size": 2}, stop=stop)
    assert sorted(p.name for p in folder.glob("class-*.png")) == ["class-00000.png", "class-00001.png"]
    assert len(prior.ensure_class_images(base, folder, **{**SETTINGS, "num_images": 4, "batch_size": 2})) == 4



@pytest.mark.slow
def test_class_images_made_with_another_vae_are_the_ones_train_uses(tiny_path, demo_subject, tmp_path):
    """`class-images --vae V` records the model as `train --vae V` looks for it, so training reuses them."""
    from boothkit.train.loop import run_training

    vae = tmp_path / "my_vae"
    shutil.copytree(tiny_path / "vae", vae)
    flags = {"model": "tiny", "vae": str(vae), "class_noun": "dog", "num_class_images": 2, "class_steps": 1,
             "class_dir": str(tmp_path / "class")}
    prior.run_class_images(C.resolve(C.CLASS_IMAGES_SECTIONS, {}, flags))
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "class").glob("*.png")}
    run_training(C.resolve(C.TRAIN_SECTIONS, {}, {**flags, "instance_dir": str(demo_subject), "max_steps": 1,
                                                   "rank": 2, "output_dir": str(tmp_path / "run")}), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "class").glob("*.png")} == made  # reused, not remade
