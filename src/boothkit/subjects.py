"""DreamBooth subjects for `mini`: held-out-style emoji (Fluent UI, never seen in pretraining), photographed.

Each subject is one Fluent emoji drawn 5 times like photos of one thing: other sizes, places, backgrounds and
small rotations (boothkit.scenes). They ship as a dataset in the google/dreambooth layout (assets/emoji_subjects:
a folder per subject and prompts_and_classes.txt in this world's words), so `boothkit bench dreambench` runs on
it as on the paper's; the girl is the demo subject. `build_dataset` remakes it from the npm pack.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

# subject folder -> (Fluent emoji name, class noun); classes are the plain nouns of the pretraining captions
SUBJECTS = {
    "girl": ("girl", "girl"), "boy": ("boy", "boy"), "woman": ("woman", "woman"), "man": ("man", "man"),
    "baby": ("baby", "baby"), "dog": ("dog", "dog"), "cat": ("cat", "cat"), "teddy_bear": ("teddy bear", "teddy bear"),
    "backpack": ("backpack", "backpack"), "car": ("automobile", "car"), "racing_car": ("racing car", "car"),
    "cup": ("teacup without handle", "cup"), "cup_with_straw": ("cup with straw", "cup"),
}
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


def demo_subject_dir() -> Path:
    """Five pictures of one Fluent UI girl emoji: the demo subject on `mini`."""
    return dataset_dir() / "girl"


def prompts_file() -> str:
    """prompts_and_classes.txt in google/dreambooth's format (parsed by boothkit.bench.parse_dataset)."""
    lines = ["Classes", "", "subject_name,class"] + [f"{k},{noun}" for k, (_, noun) in SUBJECTS.items()]
    for section in ("Object Prompts", "Live Subject Prompts"):
        lines += ["", section, ""] + [f"'{p}'.format(unique_token, class_token)"
                                      for p in PROMPTS]
    return "\n".join(lines) + "\n"


def build_dataset(out: Path, seed: int = 0) -> Path:
    """Render every subject from the Fluent UI pack and write the dataset folder `out`."""
    from PIL import Image

    from .emoji import LICENCES, load_fluent
    from .scenes import SceneGenerator

    emoji = {e.name: e for e in load_fluent([name for name, _ in SUBJECTS.values()])}
    out.mkdir(parents=True, exist_ok=True)
    for folder, (name, _) in SUBJECTS.items():
        gen = SceneGenerator([emoji[name]], seed=f"{seed}-{folder}")
        (out / folder).mkdir(exist_ok=True)
        for i in range(PHOTOS):
            Image.fromarray(gen.scene(i, p_second=0.0).image).save(out / folder / f"{i:02d}.png", optimize=True)
    (out / "prompts_and_classes.txt").write_text(prompts_file())
    (out / "SOURCE.md").write_text(
        "# Emoji subjects for `mini`\n\n"
        f"Pictures made by `boothkit.subjects.build_dataset(seed={seed})` from {LICENCES['fluent']}: each subject is "
        "one Fluent UI flat emoji drawn on other backgrounds, sizes, places and small rotations. This style never "
        "enters `mini`'s pretraining. The Fluent UI Emoji are Copyright (c) Microsoft Corporation, MIT licence.\n")
    return out
