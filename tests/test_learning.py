"""DreamBooth on `mini` learns: the first tests here that fail if training stops learning.

Short LoRA runs on the held-out Fluent girl (a style mini never saw), with and without prior preservation, judged
by mini's DINO-style evaluator against the subject's pictures, paired by sampling seed:
- the instance prompt moves towards the subject by more than seeds alone move it;
- without the prior loss the class prompt ("an image of a girl") drifts towards the subject (the paper's PRES);
  with it, it does not.
"""
import pytest
import torch

from boothkit.core import config as C

STEPS, SEEDS = 200, 16
INSTANCE, CLASS = "an image of [ktn] girl", "an image of a girl"


def train(tmp_path, name: str, prior: bool, steps: int):
    from boothkit.mini.subjects import demo_subject_dir
    from boothkit.train.loop import run_training

    cfg = C.resolve(C.TRAIN_SECTIONS, {}, {
        "model": "mini", "instance_dir": str(demo_subject_dir()), "token": "[ktn]", "class_noun": "girl",
        "instance_prompt": "an image of {token} {class_noun}", "class_prompt": "an image of a {class_noun}",
        "prior": prior, "num_class_images": 8, "class_steps": 20, "class_scheduler": "model", "class_dir": str(tmp_path / "class"),
        "train_text_encoder": True, "max_steps": steps, "learning_rate": 5e-4, "text_encoder_lr": 1e-4,
        "output_dir": str(tmp_path / name), "seed": 0})
    return run_training(cfg, progress=False)


def dino_to_subject(images, dino):
    from boothkit.train.data import load_folder
    from boothkit.evaluate.metrics import unit_rows as _unit
    from boothkit.mini.subjects import demo_subject_dir

    real = _unit(dino.image_embeds([img for _, img in load_folder(demo_subject_dir())]).double())
    return (_unit(dino.image_embeds(images).double()) @ real.T).mean(dim=1)  # one score per image


@pytest.fixture(scope="module")
def scores(tmp_path_factory, one_thread):
    """DINO-to-subject per seed: {(run, prompt): tensor}, run in base / no_prior / prior."""
    from boothkit.generate.generation import generate_images, load_generation_pipeline, set_lora_scales
    from boothkit.evaluate.metrics import DinoEvaluator

    tmp = tmp_path_factory.mktemp("learning")
    dino = DinoEvaluator("mini", torch.device("cpu"))
    kw = dict(num_images=SEEDS, seed=0, steps=20, guidance=7.5)
    out = {}
    for name, prior in (("no_prior", False), ("prior", True)):
        pipe = load_generation_pipeline(None, [(str(train(tmp, name, prior=prior, steps=STEPS)), 1.0)])
        pipe.set_progress_bar_config(disable=True)
        for prompt in (INSTANCE, CLASS):
            if name == "no_prior":
                set_lora_scales(pipe, 0.0, 0.0)  # exactly the base model
                out["base", prompt] = dino_to_subject(generate_images(pipe, prompt, **kw), dino)
                set_lora_scales(pipe, 1.0, 1.0)
            out[name, prompt] = dino_to_subject(generate_images(pipe, prompt, **kw), dino)
    return out


@pytest.mark.slow
def test_dreambooth_on_mini_raises_subject_fidelity(scores):
    before, after = scores["base", INSTANCE][:8], scores["no_prior", INSTANCE][:8]
    # Paired by seed: if training did nothing, each seed would rise or fall by chance, and all 8 rising would
    # happen with probability 1/256 (sign test); the mean gain must also be clearly above zero.
    assert (after > before).all(), (before, after)
    assert float((after - before).mean()) > 0.05, (before, after)


@pytest.mark.slow
def test_prior_preservation_keeps_the_class_off_the_subject(scores):
    base, drifted, kept = scores["base", CLASS], scores["no_prior", CLASS], scores["prior", CLASS]
    # Measured (AMD EPYC, fp32): base 0.624, no prior 0.655, prior 0.601 on average; prior below no prior for
    # 15 of 16 seeds (13 or more happen by chance with probability 0.011).
    assert float((drifted - base).mean()) > 0.015, (base, drifted)
    assert int((kept < drifted).sum()) >= 13, (kept, drifted)
    assert float((drifted - kept).mean()) > 0.025, (kept, drifted)


@pytest.mark.slow
def test_the_default_mini_recipe_binds_the_identifier(tmp_path, one_thread, lpips_weights):
    """Issue 30's bar, by a judge boothkit did not train (real LPIPS): `boothkit train --model mini` with nothing but
    the subject (mini's preset), shortened to 300 steps and 20 class images, on a held-out OpenMoji backpack: the
    identifier prompt's distance to the nearest subject photo falls by >= 0.08, the class prompt's by at most a
    quarter of that. Measured (AMD EPYC, fp32, seed 0): 0.513 -> 0.373 (0.140) and 0.509 -> 0.492 (0.017)."""
    from boothkit.evaluate import binding
    from boothkit.train.data import load_folder
    from boothkit.generate.generation import load_generation_pipeline
    from boothkit.evaluate.metrics import Evaluators, MetricsConfig
    from boothkit.mini.subjects import openmoji_dataset_dir
    from boothkit.train.loop import run_training

    folder = openmoji_dataset_dir() / "backpack"
    cfg = C.resolve(C.TRAIN_SECTIONS, {}, {"model": "mini", "instance_dir": str(folder), "class_noun": "backpack",
                                           "max_steps": 300, "num_class_images": 20,
                                           "output_dir": str(tmp_path / "run")})
    assert cfg.prior.prior and cfg.prior.prior_target == "frozen"  # the preset's recipe, not SD's defaults
    run = run_training(cfg, progress=False)
    prompts = binding.BindingPrompts(cfg.data.prompt, cfg.prior.prompt_for("backpack"))
    assert prompts.identifier == "an emoji of sks backpack"
    base = binding.draw(load_generation_pipeline("mini", []), prompts, 6, steps=20)
    drawn = binding.draw(load_generation_pipeline(None, [(str(run), 1.0)]), prompts, 6, steps=20)
    ev = Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64))
    m = binding.judge(ev, drawn, base, [img for _, img in load_folder(folder)], prompts)
    assert binding.binds(m), binding.summary(m)
