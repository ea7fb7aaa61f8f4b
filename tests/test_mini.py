"""`mini`: loads offline as a plain diffusers folder, and draws what it is asked for (a check noise cannot pass)."""
import numpy as np
import pytest
import torch

from boothkit.models.mini import mini_path
from boothkit.models.loading import load_pipeline, model_ref, native_resolution
from boothkit.evaluate.recognition import frequent_names, nearest_by_clip, recognition, reference, sample
from boothkit.mini.scenes import with_article


@pytest.fixture(scope="module")
def clip():
    from boothkit.evaluate.metrics import ClipEvaluator

    return ClipEvaluator("mini", torch.device("cpu"))


@pytest.fixture(scope="module")
def refs():
    from PIL import Image

    names, styles, arrays = reference()
    return names, [Image.fromarray(a) for a in arrays]


def test_models_path_mini_is_a_plain_diffusers_folder(capsys):
    from diffusers import StableDiffusionPipeline

    from boothkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["models", "path", "mini"])
    assert exc.value.code == 0
    path = capsys.readouterr().out.strip()
    assert path == str(mini_path("model"))
    pipe = StableDiffusionPipeline.from_pretrained(path)  # no hub, no boothkit: what a user would type
    assert pipe.unet.dtype == torch.float32 and native_resolution(pipe) == 64
    assert model_ref(path) == "mini" and model_ref("mini") == "mini"


@pytest.mark.slow
def test_evaluator_names_real_emoji_in_new_scenes(clip, refs):
    """Scenes it never saw (other seed, other backgrounds) of the reference emoji: nearest reference by name."""
    from boothkit.mini.emoji import load_emoji
    from boothkit.models.mini import mini_dir
    from boothkit.mini.scenes import SceneGenerator

    names, images = refs
    gen = SceneGenerator(load_emoji(mini_dir() / "reference.npz"), seed=12345)
    scenes = [gen.scene(i, p_second=0.0) for i in range(60)]
    order = nearest_by_clip(clip, [s.image for s in scenes], images)
    assert recognition(order, [s.main for s in scenes], names) > 0.6  # chance: 1 / len(set(names)) < 0.02


@pytest.mark.slow
def test_mini_samples_are_recognised(clip, refs, one_thread):
    names, images = refs
    want = frequent_names()[:12]
    pipe = load_pipeline("mini")
    pipe.set_progress_bar_config(disable=True)
    samples = sample(pipe, [f"an emoji of {with_article(n)}" for n in want], seeds=2, steps=20, guidance=7.5)
    again = sample(pipe, [f"an emoji of {with_article(want[0])}"], seeds=2, steps=20, guidance=7.5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(samples, again))
    order = nearest_by_clip(clip, samples, images)
    labels = [n for n in want for _ in range(2)]
    # chance: 1/60 (top-1), 5/60 (top-5); the random-weight tiny model scores 0.04 / 0.08 here, mini 0.29 / 0.62
    assert recognition(order, labels, names) >= 0.15
    assert recognition(order, labels, names, k=5) >= 0.4


@pytest.mark.slow
def test_evaluators_on_the_heldout_style(clip):
    """Fluent UI emoji (a style neither evaluator saw): CLIP names them, DINO tells the subjects apart."""
    from boothkit.evaluate.metrics import DinoEvaluator
    from boothkit.evaluate.recognition import evaluator_checks

    checks = evaluator_checks(clip, DinoEvaluator("mini", torch.device("cpu")))
    assert checks["subjects"] == 13 and checks["photos"] == 65
    assert checks["CLIP names top-5"] > 3 * (5 * checks["name chance"])  # measured 0.35 against 0.083
    assert checks["DINO instance top-1"] > 10 * checks["instance chance"]  # measured 0.82 against 0.045
    assert checks["DINO instance top-1"] > checks["CLIP-I instance top-1"]  # as DINO beats CLIP-I on real photos
