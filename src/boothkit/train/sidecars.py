"""Files beside a subject photo: NAME.txt, its caption (--captions), and NAME.mask.png, where the subject is for the
loss (--masked-loss). Both are read before the model loads, so a bad one is reported at once, by name."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..core.config import fill
from ..core.errors import DataError
from .data import open_image

log = logging.getLogger("boothkit")


@dataclass
class Sidecars:
    """Per-photo captions and loss masks (None: that option is off)."""

    captions: list[str] | None = None
    masks: list[Image.Image | None] | None = None  # "L" images of the photo's size; None: the whole photo counts


def caption_path(photo: Path) -> Path:
    return photo.with_suffix(".txt")


def mask_path(photo: Path) -> Path:
    return photo.with_name(photo.stem + ".mask.png")


def read_sidecars(photos: list[tuple[Path, Image.Image]], data) -> Sidecars:
    """The captions and masks `data` (a DataConfig) asks for, one per photo."""
    paths = [p for p, _ in photos]
    captions = masks = None
    if data.captions:
        captions = _per_photo(paths, caption_path, "--captions", lambda p, _i: read_caption(p, data.token,
                                                                                              data.class_noun),
                              "they get the instance prompt")
        captions = [c or data.prompt for c in captions]  # photos without a caption keep the instance prompt
    if data.masked_loss:
        sizes = {p: img.size for p, img in photos}
        masks = _per_photo(paths, mask_path, "--masked-loss", lambda p, photo: read_mask(p, sizes[photo]),
                           "their whole picture counts")
    return Sidecars(captions, masks)


def _per_photo(paths: list[Path], where, flag: str, read, otherwise: str) -> list:
    found = [read(where(p), p) if where(p).exists() else None for p in paths]
    missing = [p.name for p, f in zip(paths, found) if f is None]
    if len(missing) == len(paths):
        raise DataError(f"{flag}: no {where(Path('NAME.jpg')).name} beside any photo in {paths[0].parent}")
    if missing:
        log.warning("%s: %d of %d photos have no %s beside them (%s); %s", flag, len(missing), len(paths),
                    where(Path("NAME.jpg")).name, ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""),
                    otherwise)
    return found


def read_caption(path: Path, token: str, class_noun: str) -> str:
    """One caption file as one line, with {token} and {class_noun} filled in. It must name the subject: a caption
    without the identifier would teach the photo to prompts that do not summon the subject."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the caption as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the caption ({exc.strerror or type(exc).__name__})") from None
    caption = fill(" ".join(text.split()), token=token, class_noun=class_noun)
    if not caption:
        raise DataError(f"{path}: empty caption")
    # CLIP lowercases, so 'SKS' names the subject as 'sks' does; the token must stand alone, not inside a word
    if not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", caption, re.IGNORECASE):
        raise DataError(f"{path}: the caption does not name the subject; write {{token}} (or {token}) where it "
                        f"appears, e.g. 'a photo of {{token}} {class_noun or 'dog'} on a sofa'")
    return caption


def read_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A loss mask as a grey image (white: the subject counts, black: ignored), checked against its photo's size."""
    with open_image(path) as img:
        img.seek(0)
        mask = ImageOps.exif_transpose(img).convert("L")  # the photo is read upright; so is its mask
    if mask.size != size:
        raise DataError(f"{path}: the mask is {mask.width}x{mask.height} pixels but its photo is {size[0]}x{size[1]}; "
                        f"a mask must have its photo's size")
    if mask.getextrema()[1] == 0:
        raise DataError(f"{path}: the mask is all black (nothing of the photo would be learnt)")
    return mask
