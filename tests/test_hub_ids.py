"""Hub ids that exist: every hub id boothkit names (README, docs, examples, code, benchmarks) is one of the table in
boothkit.core.hub_ids, and no file names an id the hub removed (loading one is held by tests/test_hostile.py)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from boothkit.core import config as C
from boothkit.core import hub_ids

REPO = Path(__file__).resolve().parents[1]
TABLE = "src/boothkit/core/hub_ids.py"
HUB_ID = re.compile(r"\b([A-Za-z0-9][\w.-]*)/([\w.-]*[A-Za-z0-9])")


def repo_texts() -> dict[str, str]:
    """Every text file of the checkout outside tests/ (tracked, or new and not ignored): path -> text."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files to read are the tracked ones")
    texts = {}
    for name in listed:
        path = REPO / name
        if not name or name.startswith("tests/") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # pictures, weights
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    assert "README.md" in texts and TABLE in texts
    return texts


def test_no_file_names_a_removed_hub_id():
    removed = re.compile("|".join(re.escape(r) for r in hub_ids.REMOVED), re.IGNORECASE)
    found = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)} (use {hub_ids.maintained_copy(m.group(0))})"
             for name, text in repo_texts().items() if name != TABLE for m in removed.finditer(text)]
    assert found == []


def test_every_hub_id_named_is_in_the_table():
    """An id of an owner the table knows (stabilityai/..., openai/...) must be one of its ids: a new one goes into
    hub_ids.KNOWN first, where the check for removed ids sees it."""
    owners = {i.split("/")[0].lower() for i in [*hub_ids.KNOWN.values(), *hub_ids.REMOVED]}
    known = set(hub_ids.KNOWN.values())
    named = {(name, m.group(0)) for name, text in repo_texts().items() if name != TABLE
             for m in HUB_ID.finditer(text) if m.group(1).lower() in owners}
    assert {i for _, i in named} >= {hub_ids.SD15, hub_ids.SDXL}  # the scan sees the ids the docs name
    assert sorted(f"{name}: {i}" for name, i in named if i not in known) == []


def test_removed_ids_map_to_known_copies():
    assert hub_ids.REMOVED["runwayml/stable-diffusion-v1-5"] == hub_ids.SD15 == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert set(hub_ids.REMOVED.values()) <= set(hub_ids.KNOWN.values())
    assert not set(hub_ids.REMOVED) & set(hub_ids.KNOWN.values())
    assert hub_ids.maintained_copy("RunwayML/stable-diffusion-v1-5") == hub_ids.SD15  # the hub ignores case
    assert hub_ids.maintained_copy(hub_ids.SD15) is None and hub_ids.maintained_copy("tiny") is None


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples").glob("sd15-*.toml")))
def test_sd15_examples_name_the_maintained_sd15(name):
    assert C.load_toml(REPO / "examples" / name)["model"]["model"] == hub_ids.SD15
