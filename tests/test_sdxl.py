"""SDXL through the family seam, on the built-in tiny-xl (SDXL's architecture at toy size, random weights):
training, generation equal to plain diffusers, exports through diffusers' own converters, micro-conditioning,
and kill-and-resume."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.adapters.lora import LORA_FILE
from processes import kill_at, paused

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def xl_path():
    from boothkit.models.tiny import tiny_xl_model_path

    return tiny_xl_model_path()


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory, xl_path, demo_subject, one_thread):
    """A LoRA on UNet + both text encoders, prior preservation with class images from the frozen tiny-xl."""
    from boothkit.train.loop import run_training

    tmp = tmp_path_factory.mktemp("xl")
    cfg = C.resolve(C.TRAIN_SECTIONS, {}, {
        "model": "tiny-xl", "instance_dir": str(demo_subject), "class_noun": "dog", "output_dir": str(tmp / "run"),
        "max_steps": 6, "num_class_images": 2, "class_steps": 2, "train_text_encoder": True, "rank": 4,
        "learning_rate": 1e-2, "text_encoder_lr": 1e-2})
    return run_training(cfg, progress=False)


def images(pipe, n=2):
    from boothkit.generate.generation import generate_images

    return [np.asarray(im, dtype=np.int16) for im in generate_images(pipe, PROMPT, num_images=n, seed=0, steps=3,
                                                                      guidance=7.5)]


def plain_images(pipe, n=2):
    return [np.asarray(pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5,
                            generator=torch.Generator("cpu").manual_seed(s)).images[0], dtype=np.int16)
            for s in range(n)]


@pytest.mark.slow
def test_tiny_xl_is_an_sdxl_folder_plain_diffusers_loads(xl_path):
    from diffusers import StableDiffusionXLPipeline

    from boothkit.models.families import SDXL, family_of
    from boothkit.models.loading import load_pipeline, model_ref

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_path)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert family_of(load_pipeline("tiny-xl")) is SDXL and model_ref(str(xl_path)) == "tiny-xl"


@pytest.mark.slow
def test_lora_file_holds_both_text_encoders(xl_run):
    keys = load_file(xl_run / LORA_FILE).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)
    with safe_open(str(xl_run / LORA_FILE), "pt") as fh:
        assert fh.metadata()["boothkit.family"] == "sdxl"


@pytest.mark.slow
def test_generation_equals_plain_diffusers_and_zero_scales_the_base(xl_run, xl_path):
    from diffusers import StableDiffusionXLPipeline

    from boothkit.generate.generation import load_generation_pipeline, set_lora_scales

    pipe = load_generation_pipeline(None, [(str(xl_run), 1.0)])
    ours = images(pipe)
    set_lora_scales(pipe, 0.0, 0.0)
    ours_base = images(pipe)
    set_lora_scales(pipe, 1.0, 0.0)  # the text-encoder scale reaches both text encoders
    unet_only = images(pipe)
    set_lora_scales(pipe, 1.0, 1.0, 0.0)  # unless the second has its own
    te2_off = images(pipe)
    plain = StableDiffusionXLPipeline.from_pretrained(xl_path)
    base = plain_images(plain)
    plain.load_lora_weights(str(xl_run))
    trained = plain_images(plain)
    plain.set_adapters(plain.get_list_adapters()["unet"], adapter_weights=[
        {"unet": 1.0, "text_encoder": 0.0, "text_encoder_2": 0.0}])
    plain_unet_only = plain_images(plain)
    plain.set_adapters(plain.get_list_adapters()["unet"], adapter_weights=[
        {"unet": 1.0, "text_encoder": 1.0, "text_encoder_2": 0.0}])
    plain_te2_off = plain_images(plain)
    assert all(np.array_equal(a, b) for a, b in zip(ours, trained))
    assert all(np.array_equal(a, b) for a, b in zip(ours_base, base))
    assert all(np.array_equal(a, b) for a, b in zip(unet_only, plain_unet_only))
    assert all(np.array_equal(a, b) for a, b in zip(te2_off, plain_te2_off))
    assert not np.array_equal(te2_off[0], ours[0]) and not np.array_equal(te2_off[0], unet_only[0])
    assert not np.array_equal(ours[0], base[0]) and not np.array_equal(unet_only[0], ours[0])


@pytest.mark.slow
def test_exports_reproduce_the_native_images(xl_run, xl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from boothkit.export.formats import export, export_config
    from boothkit.generate.generation import load_generation_pipeline

    native = images(load_generation_pipeline(None, [(str(xl_run), 1.0)]))
    kohya = export(export_config(lora=str(xl_run), format="kohya", out=str(tmp_path / "k.safetensors")))
    with safe_open(str(kohya), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert {k.split("_")[1] for k in keys} == {"te1", "te2", "unet"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # sd-scripts' SDXL (sgm) names
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # through diffusers' own kohya converter
    assert all(np.array_equal(a, b) for a, b in zip(native, images(load_generation_pipeline("tiny-xl",
                                                                                            [(str(kohya), 1.0)]))))
    comfy = export(export_config(lora=str(xl_run), format="comfyui", out=str(tmp_path / "c.safetensors")))
    assert load_file(comfy).keys() == load_file(kohya).keys()  # ComfyUI reads SDXL LoRAs in sd-scripts' names
    merged = export(export_config(lora=str(xl_run), format="merged", out=str(tmp_path / "m")))
    fused = plain_images(StableDiffusionXLPipeline.from_pretrained(merged))
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(native, fused))
    single = export(export_config(lora=str(xl_run), format="merged-single-file", out=str(tmp_path / "s.safetensors")))
    with safe_open(str(single), "pt") as fh:  # the sgm layout: CLIP-L and an OpenCLIP-style second encoder
        keys = set(fh.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    # diffusers' own single-file loader (offline: configs from the tiny-xl folder)
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(xl_path), local_files_only=True)
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(native, plain_images(loaded)))
    from boothkit.models.families import SDXL, family_of
    from boothkit.models.loading import load_pipeline

    assert family_of(load_pipeline(str(single), model_config=str(xl_path))) is SDXL


def test_micro_conditioning_follows_each_pictures_size_and_crop():
    from boothkit.train.batches import LatentBank

    class Vae(torch.nn.Module):
        config = type("cfg", (), {"scaling_factor": 0.13025, "shift_factor": None})()
        dtype = torch.float32

    wide = Image.new("RGB", (101, 80))   # resized to 81 x 64; centre crop left (81 - 64) // 2 = 8
    tall = Image.new("RGB", (64, 96))    # already 64 wide; centre crop top (96 - 64) // 2 = 16
    bank = LatentBank([wide, tall], 64, Vae(), prompts=["x", "x"], cache=False, flip=False, random_crop=False, device="cpu")
    bank._encode = lambda px: (torch.zeros(len(px), 4, 8, 8), torch.ones(len(px), 4, 8, 8))
    _, ids = bank.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert ids.tolist() == [[80, 101, 0, 8, 64, 64], [96, 64, 16, 0, 64, 64]]
    flipped = LatentBank([wide], 64, Vae(), prompts=["x"], cache=False, flip=True, random_crop=False, device="cpu")
    flipped._encode = bank._encode
    flips = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5  # the bank's first draw
    _, ids = flipped.sample(torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(3))
    # a mirrored picture's crop is seen from the other side: 81 - (8 + 64) = 9
    assert [row[3] for row in ids.tolist()] == [9 if f else 8 for f in flips.tolist()] and 0 < flips.sum() < 16


def test_training_step_passes_the_conditioning_to_the_unet():
    from boothkit.models.families import SDXL, Conditioning
    from boothkit.train.batches import Batch
    from boothkit.train.objectives import DiffusionObjective
    from boothkit.train.loop import training_step

    seen = {}

    class Unet(torch.nn.Module):
        def forward(self, noisy, t, encoder_hidden_states, added_cond_kwargs):
            seen.update(hidden=encoder_hidden_states, **added_cond_kwargs)
            return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    ids = torch.tensor([[80., 101, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64]])
    batch = Batch(torch.randn(2, 4, 8, 8), ["a", "b"], ids)
    encode = lambda p: Conditioning(torch.ones(len(p), 77, 96), torch.full((len(p), 64), 2.0))  # noqa: E731
    training_step(SDXL, Unet(), encode, batch, DiffusionObjective(torch.linspace(0.99, 0.01, 1000), "epsilon"), None,
                  torch.Generator().manual_seed(0))
    assert torch.equal(seen["time_ids"], ids) and seen["text_embeds"].shape == (2, 64)


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(xl_path, demo_subject, tmp_path):
    def cli(*args):
        return [sys.executable, "-c", "from boothkit.cli import main; main()", "train", *map(str, args)]

    common = ["--model", "tiny-xl", "--instance-dir", demo_subject, "--class-noun", "dog", "--num-class-images", 2,
              "--class-steps", 2, "--max-steps", 16, "--checkpoint-every", 4, "--rank", 4, "--learning-rate", 1e-3,
              "--train-text-encoder", "--flip"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    full = subprocess.run(cli(*common, "--output-dir", tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    cmd, extra = paused(["train", *common, "--output-dir", out], "boothkit.train.loop:_after_step:8", tmp_path / "held")
    kill_at(cmd, tmp_path / "held", {**env, **extra})  # killed right after step 8 and its checkpoint
    resumed = subprocess.run(cli(*common, "--output-dir", out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    a, b = load_file(tmp_path / "full" / LORA_FILE), load_file(out / LORA_FILE)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.slow
def test_another_vae_trains_and_generates_with_it(xl_path, demo_subject, tmp_path, capsys):
    """--vae (e.g. an fp16-fixed SDXL VAE): recorded in the LoRA, used again by generation, as plain diffusers would."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from boothkit.cli import main
    from boothkit.generate.generation import load_generation_pipeline
    from boothkit.train.loop import run_training

    vae = AutoencoderKL.from_pretrained(xl_path / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a visibly different decoder
    vae.save_pretrained(tmp_path / "my_vae")
    run = run_training(C.resolve(C.TRAIN_SECTIONS, {}, {
        "model": "tiny-xl", "vae": str(tmp_path / "my_vae"), "instance_dir": str(demo_subject), "class_noun": "dog",
        "prior": False, "max_steps": 2, "output_dir": str(tmp_path / "run")}), progress=False)
    ours = images(load_generation_pipeline(None, [(str(run), 1.0)]))
    plain = StableDiffusionXLPipeline.from_pretrained(xl_path, vae=AutoencoderKL.from_pretrained(tmp_path / "my_vae"))
    plain.load_lora_weights(str(run))
    assert all(np.array_equal(a, b) for a, b in zip(ours, plain_images(plain)))
    default = images(load_generation_pipeline(None, [(str(run), 1.0)], vae=str(xl_path)))  # the model's own VAE
    assert not np.array_equal(ours[0], default[0])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--lora", str(run), "--vae", str(tmp_path / "nothing"), "--prompt", "x", "--out",
              str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and len(err) == 1 and "--vae" in err[0] and "nothing" in err[0]


# ------------------------------------------------------------------------------ methods and adapters on SDXL

def xl_cfg(demo_subject, out, **over):
    return C.resolve(C.TRAIN_SECTIONS, {}, {
        "model": "tiny-xl", "instance_dir": str(demo_subject), "token": "[ktn]", "class_noun": "dog",
        "instance_prompt": "a photo of {token} {class_noun}", "output_dir": str(out), "max_steps": 4,
        "prior": False, "rank": 4, "learning_rate": 1e-2, "text_encoder_lr": 1e-2, "ti_lr": 5e-2, **over})


def ti_picture(pipe):
    return pipe("a photo of [ktn] dog", num_inference_steps=2, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0)).images[0]


def plain_xl_with_embeddings(xl_path, run):
    """Plain diffusers, as its docs load an SDXL embedding: clip_l into text_encoder, clip_g into text_encoder_2."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(xl_path))
    state = load_file(run / "embeddings" / "ktn.safetensors")
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape[0] == 2
    pipe.load_textual_inversion(state["clip_l"], token="[ktn]", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="[ktn]", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ti", "pivotal"])
def test_ti_and_pivotal_train_both_text_encoders_rows_and_load_in_plain_diffusers(xl_path, demo_subject, tmp_path,
                                                                                   method, one_thread):
    """The identifier becomes new tokens in both tokenizers; the A1111/ComfyUI file holds clip_l and clip_g, which
    plain diffusers loads to the picture `boothkit generate --lora RUN` draws (pivotal: with the LoRA)."""
    from boothkit.generate.generation import load_generation_pipeline
    from boothkit.train.loop import run_training

    run = run_training(xl_cfg(demo_subject, tmp_path / "run", method=method, ti_vectors=2,
                              train_text_encoder=method == "pivotal"), progress=False)
    plain = plain_xl_with_embeddings(xl_path, run)
    if method == "pivotal":
        plain.load_lora_weights(str(run))
    ours = load_generation_pipeline(None, [(str(run), 1.0)])
    reference = ti_picture(plain)
    assert np.abs(ti_picture(ours) - reference).max() < 1e-5
    untrained = plain_xl_with_embeddings(xl_path, run)  # the embeddings alone: the pivotal LoRA did something
    assert method == "ti" or np.abs(ti_picture(untrained) - reference).max() > 1e-3


@pytest.mark.slow
def test_dora_on_sdxl_draws_what_plain_diffusers_draws(xl_path, demo_subject, tmp_path, one_thread):
    from diffusers import StableDiffusionXLPipeline

    from boothkit.generate.generation import load_generation_pipeline
    from boothkit.train.loop import run_training

    run = run_training(xl_cfg(demo_subject, tmp_path / "run", adapter="dora", train_text_encoder=True),
                       progress=False)
    plain = StableDiffusionXLPipeline.from_pretrained(str(xl_path))
    plain.load_lora_weights(str(run))
    ours = load_generation_pipeline(None, [(str(run), 1.0)])
    assert np.abs(ti_picture(ours) - ti_picture(plain)).max() < 1e-5
    assert np.abs(ti_picture(StableDiffusionXLPipeline.from_pretrained(str(xl_path))) - ti_picture(plain)).max() > 1e-3
