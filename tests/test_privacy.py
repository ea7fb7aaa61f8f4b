"""No picture boothkit writes carries the EXIF (GPS position, camera, orientation) of the photos it was given."""
import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BENCHMARK

GPS_IFD = 0x8825


def gps_jpeg(path: Path, colour) -> Path:
    """A phone-like photo: GPS position, camera make and an orientation tag (rotate 90°)."""
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0112] = 6  # Orientation
    gps = exif.get_ifd(GPS_IFD)
    gps[1], gps[2], gps[3], gps[4] = "N", (51.0, 30.0, 12.5), "W", (0.0, 7.0, 40.0)
    Image.new("RGB", (96, 64), colour).save(path, "JPEG", exif=exif.tobytes())
    assert Image.open(path).getexif().get_ifd(GPS_IFD)  # the fixture really carries a position
    return path


def assert_clean(path: Path) -> None:
    with Image.open(path) as img:
        exif = img.getexif()
        assert "exif" not in img.info and not exif and not exif.get_ifd(GPS_IFD), path
    assert b"PhoneMaker" not in path.read_bytes(), path


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        gps_jpeg(d / f"{i}.jpg", (60 * i, 120, 200))
    return d


@pytest.mark.slow
def test_training_outputs_and_generated_pictures_carry_no_exif(photos, tmp_path):
    from boothkit.core import config as C
    from boothkit.cli import main
    from boothkit.train.loop import run_training

    out = run_training(C.resolve(C.TRAIN_SECTIONS, {}, {
        "instance_dir": str(photos), "class_noun": "dog", "output_dir": str(tmp_path / "run"), "max_steps": 1,
        "num_class_images": 2, "class_steps": 2, "validate_every": 1, "validation_steps": 2}), progress=False)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--lora", str(out), "--prompt", "a [V] dog", "-n", "2", "--steps", "2",
              "--out", str(tmp_path / "gen")])
    assert exit_.value.code == 0
    written = [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".png", ".jpg")]
    written += list((tmp_path / "gen").rglob("*.png"))
    assert len([p for p in written if "class_images" in p.parts]) == 2 and len(written) >= 8
    for p in written:
        assert_clean(p)


def test_ui_uploads_are_reencoded_upright_without_exif(photos, tmp_path):
    from boothkit.train.data import load_image
    from boothkit.ui import copy_photos

    src = sorted(photos.iterdir())
    folder = copy_photos([str(p) for p in src], tmp_path / "upload")
    stored = sorted(folder.iterdir())
    assert len(stored) == 3
    for original, copy in zip(src, stored):
        assert_clean(copy)
        upright = load_image(original)
        assert upright.size == (64, 96)  # the orientation tag was applied, once
        assert np.array_equal(np.asarray(load_image(copy)), np.asarray(upright))  # the pixels training sees


def test_report_thumbnails_carry_no_exif(photos, tmp_path):
    from boothkit.train.data import load_image
    from boothkit.core.report import image_data_uri

    uri = image_data_uri(load_image(next(photos.iterdir())))
    thumb = tmp_path / "thumb.jpg"
    thumb.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    assert_clean(thumb)


@pytest.mark.slow
@pytest.mark.skipif(not (BENCHMARK / "wolf_plushie" / "04.jpg").is_file(), reason="the DreamBooth benchmark's photos "
                    "are not beside this checkout (../shared/datasets/dreambooth)")
def test_a_real_phone_photo_with_gps(tmp_path):
    from boothkit.ui import copy_photos

    real = BENCHMARK / "wolf_plushie" / "04.jpg"
    assert Image.open(real).getexif().get_ifd(GPS_IFD)
    for p in copy_photos([str(real)], tmp_path / "u").iterdir():
        with Image.open(p) as img:
            assert not img.getexif() and "exif" not in img.info
