"""`mini-flow`: its FLUX.1-style parts build, its pretraining stage runs, resumes and ships a folder that plain
diffusers loads and samples (a few steps on the reference emoji; the recipe itself is in docs/mini.md)."""
import csv
import json
import math

import pytest
import torch

from boothkit.cli import main
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
    assert (work / "flow" / "samples" / "step-00002.png").is_file()
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
