"""The photo-set audit (`boothkit check-photos`, and at the start of `train` as warnings): what in a set of subject
photos will teach the model something else than the subject. One finding per problem, each naming its file(s):

  count        too few or too many photos (DreamBooth works best with 3-5)
  small        a photo smaller than the training resolution, so it is upscaled (by how much)
  duplicate    two photos nearly the same (their 32x32 grey thumbnails correlate above 0.97): one pose, learned twice
  blurred      a photo much less sharp than the set's median (variance of the Laplacian at a common size; photos
               of 256 px and more)
  transparent  transparent pixels: training sees them composited on white
  crop         the square centre crop cuts more than a third of the picture (the subject may be cut with it)
  jpeg         a JPEG saved at a low quality (estimated from its quantisation table): blocks get learned as texture
  outlier      a photo far from the others in an embedding (DINO's, when one is given): maybe another subject
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .data import FEW_PHOTOS, MANY_PHOTOS, load_folder

DUPLICATE = 0.97  # thumbnail correlation above which two photos are one
BLURRED = 0.35  # sharpness below this share of the set's median
CROPPED = 1 / 3  # share of the picture the square centre crop may cut
LOW_QUALITY = 50  # estimated JPEG quality below this
SHARPNESS_SIDE = 256  # sharpness is measured at one size, so photos of other sizes compare
# mean cosine similarity to the other photos below this share of the set's median. Measured with mini's DINO on its
# held-out emoji subjects: a backpack among 5 dogs scores 0.28 against the dogs' 0.84; no subject's own photo falls
# under 0.90 of its set's median (the demo dog's photos: 0.61-0.85, all above 0.6 x 0.77)
OUTLIER = 0.6
# IJG's standard luminance quantisation table (quality 50), row by row, the order Pillow reports tables in
_IJG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                      92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=float)


@dataclass(frozen=True)
class Finding:
    kind: str
    file: str  # the photo's name, or "a, b" for a pair, or the folder for the count
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def audit_folder(folder: str | Path, resolution: int, embed=None) -> list[Finding]:
    """Every finding for the readable photos in `folder` (an unreadable one is named by load_folder's warning);
    `embed(images)` -> one embedding row per image, for the outlier finding."""
    photos = load_folder(folder, skip_bad=True, what="check-photos")
    embeddings = None if embed is None else np.asarray(embed([img for _, img in photos]), dtype=float)
    return audit_photos(folder, photos, resolution, embeddings)


def audit_photos(folder: str | Path, photos: list[tuple[Path, Image.Image]], resolution: int,
                 embeddings: np.ndarray | None = None) -> list[Finding]:
    """Every finding for `photos` (load_folder's (path, image) pairs) of `folder`, at training `resolution` (0: the
    model's own, not known yet: no size finding); `embeddings` (one row per photo) find outliers."""
    findings: list[Finding] = []
    if not FEW_PHOTOS <= len(photos) <= MANY_PHOTOS:
        findings.append(Finding("count", str(folder), f"{len(photos)} photos; DreamBooth works best with "
                                                      f"{FEW_PHOTOS}-5 (and gains little beyond {MANY_PHOTOS})"))
    for path, img in photos:
        findings += _one_photo(path, img, resolution)
    findings += _duplicates(photos) + _blurred(photos)
    if embeddings is not None:
        findings += _outliers(photos, embeddings)
    return findings


def _one_photo(path: Path, img: Image.Image, resolution: int) -> list[Finding]:
    found, name = [], path.name
    if resolution and min(img.size) < resolution:
        found.append(Finding("small", name, f"{img.width}x{img.height}, smaller than the training resolution "
                                            f"{resolution}: upscaled {resolution / min(img.size):.1f}x"))
    cut = 1 - min(img.size) / max(img.size)
    if cut > CROPPED:
        found.append(Finding("crop", name, f"{img.width}x{img.height}: the square centre crop cuts {cut:.0%} of it "
                                           f"(crop it around the subject, or train with --buckets)"))
    with Image.open(path) as raw:
        if "A" in raw.getbands() or "transparency" in raw.info:
            alpha = np.asarray(raw.convert("RGBA"))[..., 3]
            if (alpha < 255).any():
                found.append(Finding("transparent", name, f"{(alpha < 255).mean():.0%} of it is transparent; "
                                                          f"training sees it on white"))
        quality = jpeg_quality(raw)
        if quality is not None and quality < LOW_QUALITY:
            found.append(Finding("jpeg", name, f"a JPEG of quality about {quality}: its blocks may be learned as "
                                               f"texture (use the original or a higher quality)"))
    return found


def jpeg_quality(img: Image.Image) -> int | None:
    """The IJG quality (1-100) a JPEG's luminance table was scaled from; None for other formats."""
    tables = getattr(img, "quantization", None)
    if img.format != "JPEG" or not tables or 0 not in tables:
        return None
    scale = float(np.mean(np.asarray(tables[0], dtype=float) / _IJG_LUMA)) * 100  # IJG: table = base * S / 100
    quality = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(round(min(max(quality, 1), 100)))


def _thumbnail(img: Image.Image) -> np.ndarray:
    v = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=float).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) or 1.0)


def _duplicates(photos: list[tuple[Path, Image.Image]]) -> list[Finding]:
    thumbs = [_thumbnail(img) for _, img in photos]
    found = []
    for i in range(len(photos)):
        for j in range(i + 1, len(photos)):
            similarity = float(thumbs[i] @ thumbs[j])
            if similarity > DUPLICATE:
                found.append(Finding("duplicate", f"{photos[i][0].name}, {photos[j][0].name}",
                                     f"nearly the same picture (thumbnail correlation {similarity:.3f}): keep one, "
                                     f"or the model learns this pose twice as hard"))
    return found


def sharpness(img: Image.Image) -> float:
    """Variance of the Laplacian of the grey picture at SHARPNESS_SIDE pixels on its short side."""
    grey = img.convert("L")
    scale = SHARPNESS_SIDE / min(grey.size)
    grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                       Image.Resampling.BILINEAR)
    laplace = grey.filter(ImageFilter.Kernel((3, 3), [0, 1, 0, 1, -4, 1, 0, 1, 0], scale=1, offset=128))
    return float(np.asarray(laplace, dtype=float).var())


def _blurred(photos: list[tuple[Path, Image.Image]]) -> list[Finding]:
    if len(photos) < 3:  # a median of two says nothing
        return []
    # photos below the measuring size are left out: upscaled, any photo looks blurred (and a small one is named)
    measured = [(path, sharpness(img)) for path, img in photos if min(img.size) >= SHARPNESS_SIDE]
    if len(measured) < 3:
        return []
    median = statistics.median(v for _, v in measured)
    return [Finding("blurred", path.name, f"much less sharp than the others (sharpness {v:.0f}, the set's median "
                                          f"{median:.0f}): the model learns the blur")
            for path, v in measured if v < BLURRED * median]


def _outliers(photos: list[tuple[Path, Image.Image]], embeddings: np.ndarray) -> list[Finding]:
    if len(photos) < 3:  # with two, each is as far from the other
        return []
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = ((e @ e.T).sum(axis=1) - 1) / (len(photos) - 1)  # each photo's mean similarity to the others
    median = float(np.median(sims))
    return [Finding("outlier", path.name, f"far from the other photos (similarity {s:.2f}, the set's median "
                                          f"{median:.2f}): another subject? It would be learned as this one")
            for (path, _), s in zip(photos, sims) if s < OUTLIER * median]
