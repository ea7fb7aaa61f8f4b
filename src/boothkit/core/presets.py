"""Named recipes as data (presets/): a built-in model's own recipe, applied whenever that model trains, and the
training recipes offered by name (`boothkit train --preset NAME`, the UI's preset list), each an ordinary config
file. One place, read by the CLI, the UI, the examples (links) and the tests that parse every one."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRESETS = Path(__file__).resolve().parent.parent / "presets"
MODEL_PRESETS, RECIPES = PRESETS / "models", PRESETS / "recipes"


def _read(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:  # package data: a broken file is boothkit's bug, and its test says so
        return tomllib.load(fh)


def model_preset(model: str) -> dict[str, dict[str, Any]]:
    """A built-in model's own recipe (presets/models/<model>.toml), sectioned like a config file; {} for other models.
    It sits between the dataclass defaults and the config file: what suits SD 1.5 at 512 px (lr 1e-4, a frozen
    text encoder) learns nothing on a 6.7 M-parameter emoji model (docs/method.md)."""
    path = MODEL_PRESETS / f"{model}.toml"
    return _read(path) if re.fullmatch(r"[a-z0-9-]+", model) and path.is_file() else {}


def model_preset_flags(model: str) -> dict[str, Any]:
    """The model's preset as flat option names (--rank ...), as forms and flags give values."""
    return flat(model_preset(model))


def flat(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A sectioned config as flat option names."""
    return {key: value for table in sections.values() for key, value in table.items()}


def recipe_titles() -> dict[str, str]:
    """name -> title of every training recipe, in the order presets/recipes.toml lists them."""
    return {name: entry["title"] for name, entry in _read(PRESETS / "recipes.toml").items()}


def recipe(name: str) -> dict[str, dict[str, Any]]:
    """The training recipe `name` (presets/recipes/NAME.toml), sectioned like a config file."""
    titles = recipe_titles()
    if name not in titles:
        raise ConfigError(f"--preset {name!r}: not a preset; the presets are {', '.join(titles)}")
    return _read(RECIPES / f"{name}.toml")
