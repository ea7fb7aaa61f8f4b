"""The emoji world `mini` is trained in: real captioned images from npm emoji packs.

Two styles for pretraining: `emoji-datasource-google` (Noto Emoji, Apache-2.0) and `emoji-datasource-twitter`
(Twemoji, CC-BY 4.0), 64 px PNGs named in emoji.json. A third style, `fluentui-emoji` (MIT, SVG rendered with
resvg), never enters pretraining: DreamBooth subjects and the evaluator's held-out checks come from it. A fourth,
`openmoji` (CC BY-SA 4.0, colour SVG with black outlines, rendered with resvg), is a second held-out style.
Packs are fetched with `npm pack` into the boothkit cache; only building data needs them, never loading `mini`.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..core.errors import DataError
from ..core.files import atomic_write_bytes, boothkit_home

PACKS = {  # style -> (npm package, version)
    "google": ("emoji-datasource-google", "16.0.0"),
    "twitter": ("emoji-datasource-twitter", "16.0.0"),
    "fluent": ("fluentui-emoji", "1.3.0"),
    "openmoji": ("openmoji", "17.0.0"),
}
TRAIN_STYLES = ("google", "twitter")
HELDOUT_STYLE = "fluent"
OPENMOJI_STYLE = "openmoji"  # the second held-out style
SIZE = 64
LICENCES = {
    "google": "Noto Emoji by Google, Apache-2.0 (packaged by emoji-datasource-google, MIT)",
    "twitter": "Twemoji by Twitter/X, CC-BY 4.0 (packaged by emoji-datasource-twitter, MIT)",
    "fluent": "Fluent UI Emoji by Microsoft, MIT (npm fluentui-emoji)",
    "openmoji": ("OpenMoji by Benedikt Groß, Daniel Utz and the OpenMoji contributors (HfG Schwäbisch Gmünd), "
                 "CC BY-SA 4.0 (npm openmoji)"),
}
# The package's own attribution suggestion (README.md of npm openmoji 17.0.0).
OPENMOJI_ATTRIBUTION = ("All emojis designed by [OpenMoji](https://openmoji.org/) – the open-source emoji and icon "
                        "project. License: [CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/#)")

# Which emoji make up the world: subcategories of emoji.json (flags, symbols, families and the long tail of
# objects stay out, so a small model spends its steps on the things DreamBooth users draw).
SUBCATEGORIES = {
    "animal-amphibian", "animal-bird", "animal-bug", "animal-mammal", "animal-marine", "animal-reptile",
    "plant-flower", "plant-other", "dishware", "drink", "food-asian", "food-fruit", "food-prepared", "food-sweet",
    "food-vegetable", "person", "face-smiling", "face-affection", "cat-face", "sky & weather", "place-building",
    "transport-ground", "transport-air", "clothing", "household", "musical-instrument", "game",
}
# Plain class nouns DreamBooth users type, for emoji whose names say something else.
CLASS_NOUNS = {
    "school satchel": "backpack", "automobile": "car", "teacup without handle": "cup", "hot beverage": "cup",
    "dog face": "dog", "cat face": "cat",
}
# The seed experiment's scenes and the props that stand for them.
SCENE_PROPS = ("soft ice cream", "ice cream", "full moon symbol", "crescent moon", "classical building")
# Emoji drawn more often: the classes users train and the scene props.
BOOSTED = ("girl", "boy", "woman", "man", "baby", "dog", "cat", "teddy bear", "school satchel", "automobile",
           "teacup without handle", "dog face", "cat face") + SCENE_PROPS


@dataclass(frozen=True)
class Emoji:
    name: str        # lower-case emoji.json name, e.g. "dog face"
    style: str       # google | twitter | fluent
    image: np.ndarray  # SIZE x SIZE x 4 uint8 RGBA

    @property
    def noun(self) -> str:
        """The plain class noun a user would type ("backpack" for "school satchel")."""
        return CLASS_NOUNS.get(self.name, self.name)


def cache_dir() -> Path:
    return boothkit_home() / "emoji"


def fetch_pack(style: str, dest: Path | None = None) -> Path:
    """The pack's .tgz, fetched once with `npm pack` (the registry is the only source)."""
    package, version = PACKS[style]
    dest = dest or cache_dir() / "npm"
    path = dest / f"{package}-{version}.tgz"
    if path.is_file():
        return path
    if shutil.which("npm") is None:
        raise DataError(f"npm is needed once to fetch {package}@{version} (apt-get install npm)")
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["npm", "pack", f"{package}@{version}", "--pack-destination", str(dest)],
                         capture_output=True, text=True)
    if res.returncode != 0 or not path.is_file():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"npm pack {package}@{version} failed: {last}")
    return path


def _rgba(png: bytes) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGBA")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def catalogue(tgz: Path) -> list[dict]:
    """emoji.json of an emoji-datasource pack."""
    with tarfile.open(tgz) as tar:
        return json.load(tar.extractfile("package/emoji.json"))


def world_names(entries: Iterable[dict]) -> list[str]:
    """Names (lower case, unique, in emoji.json order) of the emoji in the pretraining world."""
    seen: dict[str, None] = {}
    for e in entries:
        name = e["name"].lower()
        if e["subcategory"] in SUBCATEGORIES and ":" not in name and e["has_img_google"] and e["has_img_twitter"]:
            seen.setdefault(name)
    return list(seen)


def load_vendor_style(style: str, names: Sequence[str] | None = None, tgz: Path | None = None) -> list[Emoji]:
    """The 64 px emoji of one emoji-datasource style, for `names` (default: the whole world)."""
    tgz = tgz or fetch_pack(style)
    entries = catalogue(tgz)
    wanted = set(names) if names is not None else set(world_names(entries))
    files = {}
    for e in entries:
        name = e["name"].lower()
        if name in wanted and name not in files and e.get(f"has_img_{style}"):
            files[name] = f"package/img/{style}/64/{e['image']}"
    out = []
    with tarfile.open(tgz) as tar:
        for name, member in files.items():
            out.append(Emoji(name, style, _rgba(tar.extractfile(member).read())))
    return out


def fluent_name(path: str) -> str | None:
    """'package/icons/flat/girl-default.svg' -> 'girl'; skin-tone variants other than default -> None."""
    m = re.fullmatch(r"package/icons/flat/(.+)\.svg", path)
    if not m:
        return None
    stem = m.group(1)
    tone = re.search(r"-(dark|light|medium|medium-dark|medium-light|default)$", stem)
    if tone and tone.group(1) != "default":
        return None
    return (stem[: tone.start()] if tone else stem).replace("-", " ")


def _svg_renderer():
    try:
        import resvg_py
    except ImportError:
        raise DataError("rendering the held-out emoji style needs resvg-py (pip install 'boothkit[data]')") from None
    return lambda svg: _rgba(bytes(resvg_py.svg_to_bytes(svg_string=svg, width=SIZE, height=SIZE)))


def load_fluent(names: Sequence[str], tgz: Path | None = None) -> list[Emoji]:
    """Held-out style: Fluent UI flat emoji rendered to 64 px RGBA with resvg."""
    render = _svg_renderer()
    tgz = tgz or fetch_pack(HELDOUT_STYLE)
    wanted, out = set(names), {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            name = fluent_name(member.name)
            if name in wanted and name not in out:
                out[name] = Emoji(name, HELDOUT_STYLE, render(tar.extractfile(member).read().decode("utf-8")))
    return [out[n] for n in names if n in out]


def openmoji_entries(names: Sequence[str], tgz: Path | None = None) -> dict[str, dict]:
    """name -> the openmoji.json entry (hexcode, openmoji_author, ...) of each Unicode emoji in `names`: the first
    of that lower-case annotation, skin-tone variants and OpenMoji's own extras left out."""
    tgz = tgz or fetch_pack(OPENMOJI_STYLE)
    wanted, out = set(names), {}
    with tarfile.open(tgz) as tar:
        for e in json.load(tar.extractfile("package/data/openmoji.json")):
            name = e["annotation"].lower()
            if name in wanted and name not in out and not e.get("skintone") and not e["group"].startswith("extras"):
                out[name] = e
    return {n: out[n] for n in names if n in out}


def load_openmoji(names: Sequence[str], tgz: Path | None = None) -> list[Emoji]:
    """Second held-out style: OpenMoji colour SVGs (package/color/svg/<hexcode>.svg, 72 x 72 with black outlines;
    the npm package has no PNGs) rendered to 64 px RGBA with resvg."""
    render = _svg_renderer()
    tgz = tgz or fetch_pack(OPENMOJI_STYLE)
    entries = openmoji_entries(names, tgz)
    with tarfile.open(tgz) as tar:
        return [Emoji(name, OPENMOJI_STYLE,
                      render(tar.extractfile(f"package/color/svg/{e['hexcode']}.svg").read().decode("utf-8")))
                for name, e in entries.items()]


def fluent_names(tgz: Path | None = None) -> list[str]:
    tgz = tgz or fetch_pack(HELDOUT_STYLE)
    with tarfile.open(tgz) as tar:
        return sorted({n for n in map(fluent_name, tar.getnames()) if n})


def save_emoji(path: Path, emoji: Sequence[Emoji]) -> None:
    """Store emoji as one .npz (names, styles, RGBA stack) so later runs need no npm or SVG renderer."""
    buf = io.BytesIO()
    np.savez_compressed(buf, names=np.array([e.name for e in emoji]), styles=np.array([e.style for e in emoji]),
                        images=np.stack([e.image for e in emoji]))
    atomic_write_bytes(path, buf.getvalue())


def load_emoji(path: Path) -> list[Emoji]:
    with np.load(path) as z:
        return [Emoji(str(n), str(s), im) for n, s, im in zip(z["names"], z["styles"], z["images"])]


def world(styles: Sequence[str] = TRAIN_STYLES) -> list[Emoji]:
    """The pretraining world's emoji in `styles`, cached as an .npz after the first build."""
    import hashlib

    packs = {s: PACKS[s] for s in (*TRAIN_STYLES, HELDOUT_STYLE)}  # as before openmoji: existing caches stay valid
    selection = hashlib.sha256(json.dumps([sorted(SUBCATEGORIES), packs], sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"world-{'-'.join(styles)}-{selection}.npz"  # a changed selection builds a new file
    if path.is_file():
        return load_emoji(path)
    names = world_names(catalogue(fetch_pack(styles[0])))
    emoji = [e for s in styles for e in load_vendor_style(s, names)]
    save_emoji(path, emoji)
    return emoji
