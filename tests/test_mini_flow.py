"""`mini-flow`: its FLUX.1-style parts build, its pretraining stage runs, resumes and ships a folder that plain
diffusers loads and samples (a few steps on the reference emoji; the recipe itself is in docs/mini.md)."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.cli import main
from boothkit.generate.generation import parse_parameters
from boothkit.models.mini import mini_dir


def test_the_parts_build_at_their_sizes():
    from boothkit.models import mini_flow as M
    from boothkit.models.families import FLUX, Conditioning

    torch.manual_seed(0)
    transformer = M.make_transformer()
    n = sum(p.numel() for p in transformer.parameters())
    assert 10e6 < n < 20e6 and not transformer.config.guidance_embeds
    cond = Conditioning(torch.randn(2, M.T5_MAX_LENGTH, M.T5["d_model"]), torch.randn(2, M.CLIP_WIDTH))
    with torch.no_grad():  # 16x16x4 latents -> 8x8 tokens of 16 channels -> back
        assert FLUX.denoise(transformer, torch.randn(2, 4, 16, 16), torch.tensor([500.0, 20.0]), cond).shape == \
            (2, 4, 16, 16)
    assert M.make_scheduler().config.use_dynamic_shifting is False


def run(*args):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args])
    return exc.value.code


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_stage_runs_resumes_and_ships_a_plain_flux_pipeline(tmp_path, monkeypatch, one_thread):
    from diffusers import FluxPipeline

    from boothkit.mini import flow_stages
    from boothkit.models import mini_flow

    # a shortened stage: a toy transformer, few scenes for the latent statistics, a small sample grid
    monkeypatch.setattr(mini_flow, "TRANSFORMER", dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                                       num_attention_heads=2))
    monkeypatch.setattr(flow_stages, "LATENT_SCENES", 128)
    monkeypatch.setattr(flow_stages, "SAMPLE_NAMES", 2)
    monkeypatch.setattr(flow_stages, "SAMPLE_SEEDS", (0,))
    monkeypatch.setattr(flow_stages, "SAMPLE_STEPS", 2)
    work = tmp_path / "work"
    common = ["--work-dir", str(work), "--emoji-file", str(mini_dir() / "reference.npz"), "--batch-size", "4",
              "--checkpoint-every", "2"]
    assert run("--stage", "flow", "--steps", "2", *common) == 0
    log = rows(work / "flow" / "log.csv")
    assert [r["step"] for r in log] == ["1", "2"] and all(math.isfinite(float(r["loss"])) for r in log)
    with Image.open(work / "flow" / "samples" / "step-00002.png") as im:  # a sample grid says how it was drawn
        params = parse_parameters(im.text["parameters"])
    assert (params["Steps"], params["CFG scale"]) == ("2", f"{flow_stages.SAMPLE_GUIDANCE:g}") and params["Seeds"]
    # a longer run of the same stage resumes from step 2's checkpoint: its rows are kept, one more is added
    assert run("--stage", "flow", "--steps", "3", *common) == 0
    resumed = rows(work / "flow" / "log.csv")
    assert [r["step"] for r in resumed] == ["1", "2", "3"] and resumed[:2] == log
    assert math.isfinite(float(resumed[2]["loss"]))

    ship = tmp_path / "ship"
    assert run("--stage", "flow-ship", "--work-dir", str(work), "--ship-dir", str(ship)) == 0
    recipe = json.loads((ship / "recipe.json").read_text())
    assert recipe["steps"] == 3 and recipe["guidance"] == flow_stages.SAMPLE_GUIDANCE
    # only what mini-flow trained ships; the pipeline folder gets mini's frozen CLIP and VAE when it is built
    assert sorted(p.name for p in (ship / "model").iterdir()) == ["text_encoder_2", "tokenizer_2", "transformer"]
    built = tmp_path / "built"
    mini_flow.assemble(ship, built)
    assert json.loads((built / mini_flow.MARKER).read_text())["resolution"] == 64
    pipe = FluxPipeline.from_pretrained(built, torch_dtype=torch.float32)  # no boothkit: a user's line
    assert pipe.vae.config.shift_factor == pytest.approx(recipe["latents"]["shift_factor"])
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.in_channels == 16
    image = pipe("an emoji of a dog", negative_prompt="", true_cfg_scale=3.0, num_inference_steps=2, height=64,
                 width=64, max_sequence_length=mini_flow.T5_MAX_LENGTH, generator=torch.Generator().manual_seed(0)
                 ).images[0]
    assert image.size == (64, 64)


# ------------------------------------------------------------------------------- DreamBooth on mini-flow

LEARN_STEPS, LEARN_CLASS_IMAGES = 300, 20
LEARN_GAIN, DINO_GAIN = 0.06, 0.05  # below the measured gains (docstring), as mini's test holds issue 30's bar


@pytest.mark.slow
def test_a_lora_on_mini_flow_learns_a_held_out_subject_and_plain_diffusers_draws_it(tmp_path, one_thread,
                                                                                     lpips_weights):
    """Issue 25: `boothkit train --model mini-flow` with nothing but the subject (its preset), shortened, on a held-out
    OpenMoji backpack (a style mini-flow never drew): judged by real LPIPS, the identifier prompt's pictures move
    towards the subject's photos, and mini's DINO tower agrees. The LoRA then draws the same pictures in plain
    FluxPipeline, from boothkit's file and from its kohya export read by diffusers' converter. Measured (AMD EPYC with
    AVX-512 BF16, fp32, seed 0): identifier 0.568 -> 0.467 (gain 0.102), class prompt gain 0.012, DINO 0.712 -> 0.846;
    2 min 33 s on 2 free cores."""
    from diffusers import FluxPipeline
    from flux_kohya import flux_converter

    from boothkit.evaluate import binding
    from boothkit.evaluate.metrics import Evaluators, MetricsConfig, mean_pairwise_cosine
    from boothkit.export import formats as E
    from boothkit.generate.generation import generate_images, load_generation_pipeline, set_lora_scales
    from boothkit.mini.subjects import openmoji_dataset_dir
    from boothkit.models import mini_flow
    from boothkit.models.families import family_of
    from boothkit.models.loading import model_path
    from boothkit.train.data import load_folder

    folder, run = openmoji_dataset_dir() / "backpack", tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["train", "--model", "mini-flow", "--instance-dir", str(folder), "--class-noun", "backpack",
              "--output-dir", str(run), "--max-steps", str(LEARN_STEPS), "--num-class-images",
              str(LEARN_CLASS_IMAGES)])
    assert done.value.code in (0, None)
    prompts = binding.BindingPrompts("an emoji of sks backpack", "an emoji of a backpack")  # the preset's prompts
    trained = load_generation_pipeline(None, [(str(run), 1.0)])
    set_lora_scales(trained, 1.0, 1.0)
    drawn = binding.draw(trained, prompts, 6, steps=20)
    base = binding.draw(load_generation_pipeline("mini-flow", []), prompts, 6, steps=20)
    ev = Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64))
    m = binding.judge(ev, drawn, base, [img for _, img in load_folder(folder)], prompts)
    photos = ev.dino.image_embeds([img for _, img in load_folder(folder)])
    dino_base = mean_pairwise_cosine(ev.dino.image_embeds(base[prompts.identifier]), photos)
    s = binding.summary(m)
    assert binding.binds(m, min_gain=LEARN_GAIN) and m["DINO"] > dino_base + DINO_GAIN, (s, m, dino_base)

    # plain diffusers: boothkit's LoRA file, then its kohya export through diffusers' converter
    guidance = family_of(trained).guidance_of(trained)  # mini-flow's own, from its marker: true CFG
    kw = dict(negative_prompt="", true_cfg_scale=guidance, height=64, width=64, num_inference_steps=20,
              max_sequence_length=mini_flow.T5_MAX_LENGTH)
    ours = np.stack([np.asarray(im, np.float32) for im in
                     generate_images(trained, prompts.identifier, num_images=2, seed=0, steps=20, guidance=guidance)])

    def plain(load):
        pipe = FluxPipeline.from_pretrained(model_path("mini-flow"), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        load(pipe)
        return np.stack([np.asarray(pipe(prompts.identifier, generator=torch.Generator().manual_seed(i), **kw)
                                    .images[0], np.float32) for i in range(2)])

    assert np.abs(plain(lambda p: p.load_lora_weights(str(run))) - ours).max() <= 2
    kohya = E.export(E.export_config(lora=str(run), format="kohya", out=str(tmp_path / "kohya.safetensors")))
    width = mini_flow.TRANSFORMER["attention_head_dim"] * mini_flow.TRANSFORMER["num_attention_heads"]
    convert = flux_converter([width] * 3 + [4 * width])

    def load_kohya(pipe):
        from safetensors.torch import load_file

        pipe.load_lora_weights(convert(load_file(str(kohya))))
    assert np.abs(plain(load_kohya) - ours).max() <= 2
