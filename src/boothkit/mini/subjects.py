"""DreamBooth subjects for `mini`: held-out-style emoji (Fluent UI, never seen in pretraining), photographed.

Each subject is one Fluent emoji drawn 5 times like photos of one thing: other sizes, places, backgrounds and
small rotations (boothkit.mini.scenes). They ship as a dataset in the google/dreambooth layout (assets/emoji_subjects:
a folder per subject and prompts_and_classes.txt in this world's words), so `boothkit bench dreambench` runs on
it as on the paper's; the girl is the demo subject. `build_dataset` remakes it from the npm pack.

A second held-out style, OpenMoji (CC BY-SA 4.0: colour with black outlines), ships six of the same subjects in
assets/emoji_subjects_openmoji (`build_dataset(out, style="openmoji")`), drawn in the same scenes as their Fluent
namesakes, so the two sets differ only in style.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..core.files import atomic_folder
from .emoji import LICENCES, OPENMOJI_ATTRIBUTION, PACKS, load_fluent, load_openmoji, openmoji_entries
from .scenes import SceneGenerator

# subject folder -> (Fluent emoji name, class noun); classes are the plain nouns of the pretraining captions
SUBJECTS = {
    "girl": ("girl", "girl"), "boy": ("boy", "boy"), "woman": ("woman", "woman"), "man": ("man", "man"),
    "baby": ("baby", "baby"), "dog": ("dog", "dog"), "cat": ("cat", "cat"), "teddy_bear": ("teddy bear", "teddy bear"),
    "backpack": ("backpack", "backpack"), "car": ("automobile", "car"), "racing_car": ("racing car", "car"),
    "cup": ("teacup without handle", "cup"), "cup_with_straw": ("cup with straw", "cup"),
}
# the OpenMoji subjects: emoji of the same names (OpenMoji's annotations), the same class nouns
OPENMOJI_SUBJECTS = {k: SUBJECTS[k] for k in ("dog", "cat", "teddy_bear", "backpack", "car", "cup")}
LIVE_CLASSES = ("girl", "boy", "woman", "man", "baby", "dog", "cat")
PHOTOS = 5
# The paper's prompt structure in this world's words: recontextualisation (backgrounds), accessorisation
# (an object beside it: the seed experiment's three scenes among them) and property (drawing style).
PROMPTS = (
    "an emoji of {0} {1} on a light blue background", "an emoji of {0} {1} on a pink background",
    "an emoji of {0} {1} on a dark blue background", "an emoji of {0} {1} on a striped background",
    "an emoji of {0} {1} on a checkered background",
    "an emoji of {0} {1} next to a soft ice cream", "an emoji of {0} {1} next to a full moon symbol",
    "an emoji of {0} {1} next to a classical building", "an emoji of {0} {1} next to a teddy bear",
    "an emoji of {0} {1} next to a slice of pizza",
    "an emoji of {0} {1}, google style", "an emoji of {0} {1}, twitter style",
)
# The seed experiment's scenes ("eating ice cream", "on the moon", "in the Acropolis") as the captions say them
SEED_SCENES = {"eating ice cream": "soft ice cream", "on the moon": "full moon symbol",
               "in the Acropolis": "classical building"}


def dataset_dir() -> Path:
    return Path(str(resources.files("boothkit") / "assets" / "emoji_subjects"))


def openmoji_dataset_dir() -> Path:
    """The OpenMoji subjects (OPENMOJI_SUBJECTS), in the same layout as dataset_dir()."""
    return Path(str(resources.files("boothkit") / "assets" / "emoji_subjects_openmoji"))


def demo_subject_dir() -> Path:
    """Five pictures of one Fluent UI girl emoji (close to mini's own girl: the demo's subject until the demo moved
    to an OpenMoji backpack, which mini never drew); the speed benchmark and the learning tests train on it."""
    return dataset_dir() / "girl"


def prompts_file(subjects: dict[str, tuple[str, str]] = SUBJECTS) -> str:
    """prompts_and_classes.txt in google/dreambooth's format (parsed by boothkit.evaluate.bench.parse_dataset)."""
    lines = ["Classes", "", "subject_name,class"] + [f"{k},{noun}" for k, (_, noun) in subjects.items()]
    for section in ("Object Prompts", "Live Subject Prompts"):
        lines += ["", section, ""] + [f"'{p}'.format(unique_token, class_token)"
                                      for p in PROMPTS]
    return "\n".join(lines) + "\n"


def build_dataset(out: Path, seed: int = 0, style: str = "fluent") -> Path:
    """Render every subject from the Fluent UI pack (style "openmoji": the OpenMoji subjects from the OpenMoji
    pack) and write the dataset folder `out`."""
    from PIL import Image


    if style not in ("fluent", "openmoji"):
        raise ValueError(f"style {style!r}: expected 'fluent' or 'openmoji'")
    subjects = SUBJECTS if style == "fluent" else OPENMOJI_SUBJECTS
    load = load_fluent if style == "fluent" else load_openmoji
    emoji = {e.name: e for e in load([name for name, _ in subjects.values()])}
    with atomic_folder(out) as tmp:  # a rebuild killed midway leaves the earlier dataset whole
        for folder, (name, _) in subjects.items():
            gen = SceneGenerator([emoji[name]], seed=f"{seed}-{folder}")
            (tmp / folder).mkdir()
            for i in range(PHOTOS):
                Image.fromarray(gen.scene(i, p_second=0.0).image).save(tmp / folder / f"{i:02d}.png", optimize=True)
        (tmp / "prompts_and_classes.txt").write_text(prompts_file(subjects))
        (tmp / "SOURCE.md").write_text(_openmoji_source(seed) if style == "openmoji" else _fluent_source(seed),
                                       encoding="utf-8")
    return out


def _fluent_source(seed: int) -> str:
    return (
        "# Emoji subjects for `mini`\n\n"
        f"Pictures made by `boothkit.mini.subjects.build_dataset(seed={seed})` from {LICENCES['fluent']}: each subject is "
        "one Fluent UI flat emoji drawn on other backgrounds, sizes, places and small rotations. This style never "
        "enters `mini`'s pretraining. The Fluent UI Emoji are Copyright (c) Microsoft Corporation, MIT licence.\n")


def _openmoji_source(seed: int) -> str:
    entries = openmoji_entries([name for name, _ in OPENMOJI_SUBJECTS.values()])
    rows = []
    for folder, (name, _) in OPENMOJI_SUBJECTS.items():
        e = entries[name]
        rows.append(f"| `{folder}` | {e['emoji']} {name} | `color/svg/{e['hexcode']}.svg` | {e['openmoji_author']} |")
    package, version = PACKS["openmoji"]
    return (
        "# OpenMoji emoji subjects for `mini`\n\n"
        f"{OPENMOJI_ATTRIBUTION}\n\n"
        f"Pictures made by `boothkit.mini.subjects.build_dataset(out, seed={seed}, style=\"openmoji\")` from "
        f"{LICENCES['openmoji']}, version {version}: each subject is one OpenMoji colour emoji (its SVG rendered to "
        "64 px with resvg) drawn on other backgrounds, sizes, places and small rotations, in the same scenes as the "
        "Fluent UI subject of the same folder name. This style never enters `mini`'s pretraining.\n\n"
        "| subject | emoji | file in the npm package | designed by (openmoji.json) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        "OpenMoji graphics are licensed under the Creative Commons Attribution-ShareAlike 4.0 International licence "
        "(CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/; the package's LICENSE.txt), by Benedikt "
        "Groß, Daniel Utz and the OpenMoji contributors, HfG Schwäbisch Gmünd (https://openmoji.org, "
        "https://github.com/hfg-gmuend/openmoji). Changes made: rendered to 64 px, resized, rotated and composited "
        "onto backgrounds. These pictures are adapted material and are shared under the same licence, "
        f"CC BY-SA 4.0; no warranties are given. Source: npm `{package}@{version}`.\n")
