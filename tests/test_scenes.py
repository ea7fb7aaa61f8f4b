"""The scene generator: deterministic, and its captions say what it drew. Runs on the reference emoji that ship
with `mini` (real Noto and Twemoji pictures), so no npm is needed."""
import re

import numpy as np
import pytest

from boothkit.mini.emoji import BOOSTED, CLASS_NOUNS, Emoji, fluent_name, load_emoji, world_names
from boothkit.models.mini import mini_dir
from boothkit.mini.scenes import BACKGROUNDS, SceneGenerator, article


@pytest.fixture(scope="module")
def emoji():
    return load_emoji(mini_dir() / "reference.npz")


def test_same_seed_same_scenes_other_seed_other_scenes(emoji):
    a, b, c = SceneGenerator(emoji, seed=3), SceneGenerator(emoji, seed=3), SceneGenerator(emoji, seed=4)
    for i in (0, 1, 17, 10**6):
        sa, sb = a.scene(i), b.scene(i)
        assert sa.caption == sb.caption and np.array_equal(sa.image, sb.image)
    assert [a.scene(i).caption for i in range(20)] != [c.scene(i).caption for i in range(20)]
    assert len({a.scene(i).caption for i in range(50)}) > 30


CAPTION = re.compile(r"^an (emoji|image) of an? (?P<main>[^,]+?)( next to an? (?P<second>[^,]+?))?"
                     r"( on an? (?P<bg>[a-z ]+) background)?(, (?P<style>google|twitter) style)?$")


def outside_boxes(scene) -> np.ndarray:
    mask = np.ones(scene.image.shape[:2], bool)
    for x, y, s in scene.boxes:
        mask[max(y, 0):max(y + s, 0), max(x, 0):max(x + s, 0)] = False
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_captions_match_what_was_drawn(emoji, seed):
    gen = SceneGenerator(emoji, seed=seed)
    for i in range(60):
        s = gen.scene(i)
        m = CAPTION.match(s.caption)
        assert m, s.caption
        assert m["main"] in (s.main, CLASS_NOUNS.get(s.main, s.main)), s.caption
        assert (m["second"] or None) == s.second and len(s.boxes) == (2 if s.second else 1)
        assert m["bg"] in (None, s.background) and m["style"] in (None, s.style)
        # the background is the one named: outside the objects only its colours appear
        colour, second, _ = BACKGROUNDS[s.background]
        allowed = {tuple(colour)} | ({tuple(second)} if second else set())
        outside = {tuple(p) for p in s.image[outside_boxes(s)].reshape(-1, 3)}
        assert outside <= allowed, (s.caption, list(outside - allowed)[:3])
        # and each object is really there: its box holds many pixels of other colours
        for x, y, size in s.boxes:
            box = s.image[max(y, 0):y + size, max(x, 0):x + size].reshape(-1, 3)
            drawn = np.mean([tuple(p) not in allowed for p in box])
            assert drawn > 0.1, (s.caption, drawn)


def test_pinned_main_style_and_second(emoji):
    gen = SceneGenerator(emoji, seed=0)
    s = gen.scene(5, main="girl", second="soft ice cream", style="twitter")
    assert s.main == "girl" and s.style == "twitter" and s.second == "soft ice cream"
    assert "girl next to a soft ice cream" in s.caption
    assert gen.scene(6, main="dog", p_second=0.0).second is None


def test_article_and_names():
    assert article("apple") == "an" and article("girl") == "a"
    assert fluent_name("package/icons/flat/girl-default.svg") == "girl"
    assert fluent_name("package/icons/flat/girl-dark.svg") is None
    assert fluent_name("package/icons/flat/soft-ice-cream.svg") == "soft ice cream"
    entries = [{"name": "GIRL", "subcategory": "person", "has_img_google": True, "has_img_twitter": True},
               {"name": "FAMILY: MAN, GIRL", "subcategory": "person", "has_img_google": True, "has_img_twitter": True},
               {"name": "EGYPT FLAG", "subcategory": "country-flag", "has_img_google": True, "has_img_twitter": True},
               {"name": "DOG", "subcategory": "animal-mammal", "has_img_google": True, "has_img_twitter": False}]
    assert world_names(entries) == ["girl"]


@pytest.mark.slow
def test_boosted_class_nouns_are_frequent(emoji):
    gen = SceneGenerator(emoji, seed=0)
    mains = [gen.scene(i).main for i in range(3000)]
    plain = [n for n in gen.names if n not in BOOSTED]
    boosted_share = sum(mains.count(n) for n in BOOSTED if n in gen.names) / sum(n in gen.names for n in BOOSTED)
    plain_share = sum(mains.count(n) for n in plain) / len(plain)
    assert boosted_share > 4 * plain_share  # drawn 8 times as often by design
    assert isinstance(emoji[0], Emoji) and emoji[0].image.shape == (64, 64, 4)
