"""boothkit.evaluate.binding: the identifier's likeness, the class prompt's drift and the bar they are held to, checked against
LPIPS called directly on each pair (an independent computation)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.evaluate import binding
from boothkit.evaluate import metrics as M
from boothkit.mini.subjects import SEED_SCENES


def _pictures(seed: int, n: int) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def ev(lpips_weights):
    return SimpleNamespace(lpips=M.load_lpips("alex"), cfg=SimpleNamespace(lpips_size=64, eval_batch_size=3))


def _direct(model, a, b) -> float:
    with torch.inference_mode():
        return float(model(M.lpips_tensor(a, 64)[None], M.lpips_tensor(b, 64)[None]))


def test_nearest_lpips_is_the_mean_distance_to_the_nearest_photo(ev):
    samples, photos = _pictures(0, 4), _pictures(1, 3)
    want = np.mean([min(_direct(ev.lpips, s, p) for p in photos) for s in samples])
    assert binding.nearest_lpips(ev, samples, photos) == pytest.approx(want, rel=1e-5)
    assert binding.nearest_lpips(ev, photos[:2], photos) == pytest.approx(0.0, abs=1e-6)  # a photo is its own nearest


def test_paired_lpips_compares_seed_by_seed(ev):
    a, b = _pictures(2, 3), _pictures(3, 3)
    want = np.mean([_direct(ev.lpips, x, y) for x, y in zip(a, b)])
    assert binding.paired_lpips(ev, a, b) == pytest.approx(want, rel=1e-5)
    assert binding.paired_lpips(ev, a, a) == pytest.approx(0.0, abs=1e-6)


def test_the_prompts_are_the_identifier_the_class_and_the_seed_scenes():
    p = binding.binding_prompts("an emoji of sks dog", "an emoji of a dog")
    assert p.all() == ["an emoji of sks dog", "an emoji of a dog",
                       *(f"an emoji of sks dog next to a {prop}" for prop in SEED_SCENES.values())]


@pytest.mark.parametrize("identifier, klass, ok", [
    ((0.50, 0.40), (0.50, 0.48), True),    # gain 0.10, class 0.02 <= 0.025
    ((0.50, 0.40), (0.50, 0.47), False),   # class 0.03: the class went with it
    ((0.50, 0.43), (0.50, 0.50), False),   # gain 0.07: too little learned
    ((0.50, 0.40), (0.50, 0.55), True),    # the class moving away from the subject is no drift towards it
])
def test_binds_holds_issue_30s_bar(identifier, klass, ok):
    m = {"likeness_lpips_base": identifier[0], "likeness_lpips": identifier[1], "class_lpips_base": klass[0],
         "class_lpips": klass[1]}
    assert binding.binds(m) is ok
