"""Reading subject photos: every mode and container to RGB, EXIF orientation, bad files, crops."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.train.data import list_images, load_folder, load_image, prepare, resize_shorter, to_rgb
from boothkit.core.errors import DataError


def _solid(mode, size=(40, 30), color=None):
    return Image.new(mode, size, color)


@pytest.mark.parametrize("mode, color, expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),          # pure red in CMYK
    ("L", 128, (128, 128, 128)),
    ("RGBA", (0, 0, 255, 0), (255, 255, 255)),        # fully transparent -> white background
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("LA", (0, 0), (255, 255, 255)),
])
def test_modes_to_rgb(mode, color, expected):
    out = to_rgb(_solid(mode, color=color))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == pytest.approx(expected, abs=1)


def test_half_transparent_composites_on_white():
    out = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert out.getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_16bit_greyscale_scaled_not_clipped():
    img = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    assert to_rgb(img).getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))          # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[2] > 200            # blue ends up on top


@pytest.mark.parametrize("ext, fmt", [(".png", "PNG"), (".webp", "WEBP"), (".gif", "GIF"), (".bmp", "BMP"),
                                      (".jpg", "JPEG")])
def test_containers(tmp_path, ext, fmt):
    path = tmp_path / f"x{ext}"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(path, fmt)
    assert load_image(path).size == (16, 16)


def test_mpo_first_frame(tmp_path):
    path = tmp_path / "x.mpo"
    first = Image.new("RGB", (32, 32), (200, 0, 0))
    first.save(path, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 16), (0, 0, 0))])
    out = load_image(path)
    assert out.size == (32, 32) and out.getpixel((5, 5))[0] > 150


def test_bad_file_named_or_skipped(tmp_path, caplog):
    for i in range(3):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"broken\.jpg.*--skip-bad-images"):
        load_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        assert len(load_folder(tmp_path, skip_bad=True)) == 3
    assert "broken.jpg" in caplog.text


def test_photo_count_warnings(tmp_path, caplog):
    for i in range(2):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        assert len(load_folder(tmp_path)) == 2
    assert "has 2 photos" in caplog.text


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "nope")
    with pytest.raises(DataError, match="no readable images"):
        load_folder(tmp_path)


def test_resize_and_crops():
    img = Image.new("RGB", (300, 150))
    img.paste((255, 255, 255), (0, 0, 150, 150))      # left square white
    assert resize_shorter(img, 64).size == (128, 64)
    center = prepare(img, 64)
    assert center.shape == (3, 64, 64) and center.min() >= -1 and center.max() <= 1
    # centre crop straddles the boundary: left half white, right half black
    assert center[0, 32, 5] > 0.9 and center[0, 32, 60] < -0.9
    a = prepare(img, 64, True, torch.Generator().manual_seed(3))
    b = prepare(img, 64, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    crops = {prepare(img, 64, True, torch.Generator().manual_seed(s)).mean().item() for s in range(8)}
    assert len(crops) > 1


def test_demo_subject_loads(demo_subject):
    photos = load_folder(demo_subject)
    assert len(photos) == 5 and all(img.mode == "RGB" for _, img in photos)
