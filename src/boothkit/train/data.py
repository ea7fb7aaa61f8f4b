"""Subject photos and class images: reading any image file into RGB, resizing, cropping, flipping."""
from __future__ import annotations

import contextlib
import logging
import math
import struct
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import DataError

log = logging.getLogger("boothkit")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".mpo", ".tif", ".tiff")
FEW_PHOTOS, MANY_PHOTOS = 3, 20
TINY_SIDE = 64  # below this a photo is upscaled so far for any model that it teaches blur, not the subject
# What Pillow raises for a damaged or foreign file: on open, on decoding, and from format plugins (EOFError,
# struct.error) that do not wrap their own failures. DecompressionBombError is none of these: it is caught apart.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)


def list_images(folder: str | Path, what: str = "--instance-dir") -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden and temp files and NAME.mask.png masks ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith(".") and not p.stem.lower().endswith(".mask"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: EXIF orientation applied, transparency composited on white, 16-bit scaled."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """Image.open for a user's file: whatever makes it unreadable, on opening or on decoding in the `with` body,
    becomes a DataError naming it. Pillow's decompression-bomb guard stays on: an image over twice its pixel limit
    is refused by name; one over the limit is read, with a warning naming the file instead of Pillow's own."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _warn_if_huge(path, img)
                yield img
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large to decode safely ({exc})") from None
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def _warn_if_huge(path: Path, img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        log.warning("%s: %dx%d pixels, over Pillow's %d-pixel guard; it is read, but slowly and with much memory",
                    path, img.width, img.height, limit)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB (first frame of GIF/MPO); unreadable files raise DataError naming them."""
    with open_image(path) as img:
        img.seek(0)
        img.load()
        return to_rgb(img)


def load_folder(folder: str | Path, *, skip_bad: bool = False, what: str = "--instance-dir") -> list[tuple[Path, Image.Image]]:
    """All readable images of a subject folder; a bad file stops the run unless `skip_bad`."""
    out = []
    for path in list_images(folder, what):
        try:
            out.append((path, load_image(path)))
        except DataError as exc:
            if not skip_bad:  # only training reads with a skip option; other folders are read whole
                raise DataError(f"{exc} (use --skip-bad-images to skip it)" if what == "--instance-dir" else str(exc)) \
                    from None
            log.warning("skipping %s", exc)
            continue
        if what == "--instance-dir":  # the photos training upscales; evaluation resizes its own way
            _warn_if_tiny(path, out[-1][1])
    if not out:
        raise DataError(f"{what} {folder}: no readable images ({', '.join(IMAGE_EXTS)})")
    if what == "--instance-dir" and not FEW_PHOTOS <= len(out) <= MANY_PHOTOS:  # a subject's photos, not others
        log.warning("%s %s has %d photos; DreamBooth works best with %d-%d", what, folder, len(out), FEW_PHOTOS, 5)
    return out


def _warn_if_tiny(path: Path, img: Image.Image) -> None:
    if min(img.size) < TINY_SIDE:
        log.warning("%s is only %dx%d pixels; it is upscaled to the training resolution and will look blurry",
                    path, img.width, img.height)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (Lanczos when shrinking)."""
    return resize_cover(img, size, size)


def resize_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize, keeping the aspect, to the smallest size that covers width x height (Lanczos when shrinking)."""
    w, h = img.size
    scale = max(width / w, height / h)
    new = (max(width, round(w * scale)), max(height, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.Resampling.LANCZOS)


def aspect_buckets(resolution: int, step: int = 64, max_ratio: float = 2.5) -> list[tuple[int, int]]:
    """(width, height) buckets in multiples of `step` of at most resolution² pixels, sorted by aspect (kohya's
    scheme): for each width the tallest height that fits, and its transpose, up to `max_ratio`:1 either way."""
    area, found = resolution * resolution, set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(w, h) <= max_ratio * min(w, h):
            found |= {(w, h), (h, w)}
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is nearest to that of `size` (width, height), on a log scale (2:1 and 1:2 equally far from 1:1)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def crop_box(img: Image.Image, size: int, random_crop: bool, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    w, h = img.size
    if random_crop:
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return left, top, left + size, top + size


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def prepare(img: Image.Image, size: int, random_crop: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize the shorter side, crop a square, return the VAE input tensor."""
    img = resize_shorter(img, size)
    return to_tensor(img.crop(crop_box(img, size, random_crop, generator)))


def stack_prepared(images: Iterable[Image.Image], size: int) -> torch.Tensor:
    """Centre-cropped tensors of several images, stacked (N, 3, size, size)."""
    return torch.stack([prepare(img, size) for img in images])
