"""DreamBooth on `mini` learns: the first tests here that fail if training stops learning.

A short LoRA run on the held-out Fluent girl (a style mini never saw) must move the samples of the instance
prompt towards the subject's pictures, as judged by mini's DINO-style evaluator, by more than seeds alone move them.
"""
import pytest
import torch

from boothkit import config as C


def train(tmp_path, name: str, prior: bool, steps: int):
    from boothkit.subjects import demo_subject_dir
    from boothkit.train import run_training

    cfg = C.resolve(C.TRAIN_SECTIONS, {}, {
        "model": "mini", "instance_dir": str(demo_subject_dir()), "token": "[ktn]", "class_noun": "girl",
        "instance_prompt": "an image of {token} {class_noun}", "class_prompt": "an image of a {class_noun}",
        "prior": prior, "num_class_images": 8, "class_steps": 20, "class_dir": str(tmp_path / "class"),
        "train_text_encoder": True, "max_steps": steps, "learning_rate": 5e-4, "text_encoder_lr": 1e-4,
        "output_dir": str(tmp_path / name), "seed": 0})
    return run_training(cfg, progress=False)


def dino_to_subject(images, dino):
    from boothkit.data import load_folder
    from boothkit.metrics import _unit
    from boothkit.subjects import demo_subject_dir

    real = _unit(dino.image_embeds([img for _, img in load_folder(demo_subject_dir())]).double())
    return (_unit(dino.image_embeds(images).double()) @ real.T).mean(dim=1)  # one score per image


@pytest.mark.slow
def test_dreambooth_on_mini_raises_subject_fidelity(tmp_path, one_thread):
    from boothkit.generate import generate_images, load_generation_pipeline, set_lora_scales
    from boothkit.metrics import DinoEvaluator

    run = train(tmp_path, "lora", prior=False, steps=STEPS)
    pipe = load_generation_pipeline(None, [(str(run), 1.0)])
    pipe.set_progress_bar_config(disable=True)
    dino = DinoEvaluator("mini", torch.device("cpu"))
    kw = dict(num_images=SEEDS, seed=0, steps=20, guidance=7.5)
    set_lora_scales(pipe, 0.0, 0.0)  # exactly the base model
    before = dino_to_subject(generate_images(pipe, "an image of [ktn] girl", **kw), dino)
    set_lora_scales(pipe, 1.0, 1.0)
    after = dino_to_subject(generate_images(pipe, "an image of [ktn] girl", **kw), dino)
    # Paired by seed: if training did nothing, each seed would rise or fall by chance, and all 8 rising would
    # happen with probability 1/256 (sign test); the mean gain must also be clearly above zero.
    assert (after > before).all(), (before, after)
    assert float((after - before).mean()) > MARGIN, (before, after)


STEPS, SEEDS, MARGIN = 60, 8, 0.05
