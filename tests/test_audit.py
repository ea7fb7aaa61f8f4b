"""`boothkit check-photos` (issue 26 item 6): each planted problem is named with its file, a clean set has none,
and training says the same as warnings."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from boothkit.cli import main
from boothkit.train.audit import audit_folder, jpeg_quality


def check(capsys, *args) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        main(["check-photos", *map(str, args)])
    return exc.value.code, capsys.readouterr().out.splitlines()


@pytest.fixture
def clean(demo_subject, tmp_path) -> Path:
    folder = tmp_path / "clean"
    folder.mkdir()
    for p in sorted(demo_subject.glob("*.jpg")):
        shutil.copy(p, folder / p.name)
    return folder


def test_a_clean_set_has_no_finding(clean, capsys):
    assert audit_folder(clean, 256) == []
    assert check(capsys, clean, "--resolution", 256, "--strict") == (0, [f"0 findings in {clean}: ready to train"])


def plant(folder: Path, kind: str) -> str:
    """Give the set the problem `kind` (a photo replaced by a damaged version of itself, so that it is no copy of
    another); returns the file names the finding must name."""
    def replace(name: str, new_name: str, change) -> str:
        img = Image.open(folder / name).convert("RGB")
        (folder / name).unlink()
        change(img).save(folder / new_name, **({"quality": 15} if kind == "jpeg" else {}))
        return new_name

    if kind == "small":
        return replace("00.jpg", "small.png", lambda im: im.resize((96, 96)))
    if kind == "duplicate":  # the same photo again, re-encoded
        Image.open(folder / "00.jpg").save(folder / "again.jpg", quality=90)
        return "00.jpg, again.jpg"
    if kind == "blurred":
        return replace("01.jpg", "blurred.png", lambda im: im.filter(ImageFilter.GaussianBlur(4)))
    if kind == "transparent":
        def cut_out(im):
            rgba = im.convert("RGBA")
            rgba.paste((255, 255, 255, 0), (0, 0, 64, 256))  # a quarter transparent
            return rgba
        return replace("02.jpg", "cutout.png", cut_out)
    if kind == "crop":
        return replace("03.jpg", "panorama.png", lambda im: im.resize((768, 256)))
    if kind == "jpeg":
        return replace("04.jpg", "blocky.jpg", lambda im: im)
    assert kind == "count"
    for p in sorted(folder.glob("*.jpg"))[2:]:
        p.unlink()
    return str(folder)


@pytest.mark.parametrize("kind", ["small", "duplicate", "blurred", "transparent", "crop", "jpeg", "count"])
def test_each_planted_problem_is_named_once_with_its_file(clean, capsys, kind):
    names = plant(clean, kind)
    found = audit_folder(clean, 256)
    assert [(f.kind, f.file) for f in found] == [(kind, names)], [str(f) for f in found]
    code, out = check(capsys, clean, "--resolution", 256)
    assert code == 0 and out[0].split(None, 1) == [kind, str(found[0])] and out[-1].endswith(f"({kind})")
    assert check(capsys, clean, "--resolution", 256, "--strict")[0] == 2


def test_jpeg_quality_is_read_back_from_the_file(tmp_path):
    img = Image.new("RGB", (64, 64), (120, 80, 40))
    for q in (15, 50, 90):
        img.save(tmp_path / f"{q}.jpg", quality=q)
        assert abs(jpeg_quality(Image.open(tmp_path / f"{q}.jpg")) - q) <= 1
    img.save(tmp_path / "x.png")
    assert jpeg_quality(Image.open(tmp_path / "x.png")) is None


def test_training_warns_with_the_same_findings(clean, tmp_path, caplog):
    plant(clean, "blurred")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--instance-dir", str(clean), "--class-noun", "dog", "--no-prior", "--max-steps", "1",
              "--rank", "2", "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "blurred.png" in r.getMessage()]
    assert warned == [f"--instance-dir {clean}: blurred.png: " + str(audit_folder(clean, 0)[0]).split(": ", 1)[1]]


def test_with_an_embedding_another_subject_is_an_outlier(tmp_path, capsys):
    """mini's DINO on its held-out emoji: a backpack among the dog's photos is named; the dog's own set is clean."""
    from boothkit.mini.subjects import dataset_dir

    folder = tmp_path / "dog"
    shutil.copytree(dataset_dir() / "dog", folder)
    assert check(capsys, folder, "--resolution", 64, "--dino-model", "mini") == (
        0, [f"0 findings in {folder}: ready to train"])
    shutil.copy(dataset_dir() / "backpack" / "00.png", folder / "backpack.png")
    code, out = check(capsys, folder, "--resolution", 64, "--dino-model", "mini")
    assert code == 0 and [line.split()[:2] for line in out[:-1]] == [["outlier", "backpack.png:"]], out


def test_strict_photos_refuses_to_train_in_one_line(clean, tmp_path, capsys):
    plant(clean, "blurred")
    plant(clean, "crop")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--instance-dir", str(clean), "--class-noun", "dog", "--no-prior", "--max-steps", "1",
              "--output-dir", str(tmp_path / "out"), "--strict-photos"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"error: --instance-dir {clean}: panorama.png: ")
    assert err[-1].endswith(f"(and 1 more: boothkit check-photos {clean}); --strict-photos refuses it")
    assert not (tmp_path / "out").exists()
