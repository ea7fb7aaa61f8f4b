"""The flow-matching families (FLUX.1, SD3/3.5) through the family seam: the training loss against a reference
written from diffusers' train_dreambooth_lora_{flux,sd3}.py, a LoRA run whose file plain diffusers loads, and the
refusals that name the fix."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from boothkit.cli import main
from boothkit.core import config as C
from boothkit.core.errors import ModelError
from boothkit.models.families import FLUX, SD3, family_of, family_of_single_file
from boothkit.models.loading import load_pipeline, model_path
from boothkit.train.batches import Batch, PromptEncoder
from boothkit.train.loop import training_step
from boothkit.train.objectives import flow_objective

PROMPTS = ["a photo of sks dog", "a photo of sks dog", "a photo of dog", "a photo of dog"]


@pytest.fixture(scope="module")
def flux():
    pipe = load_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3():
    pipe = load_pipeline("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_cfg(**kw) -> C.TrainConfig:
    return dataclasses.replace(C.TrainConfig(output_dir="x"), **kw)


def boothkit_loss(pipe, latents, cfg, seed: int, prior_weight=1.0):
    family = family_of(pipe)
    encode = PromptEncoder(family, [getattr(pipe, t) for t in family.tokenizers],
                           [getattr(pipe, n) for n in family.text_encoders], list(dict.fromkeys(PROMPTS)), cache=True,
                           device="cpu")
    objective = flow_objective(pipe.scheduler, cfg)
    with torch.no_grad():
        return training_step(family, pipe.transformer, encode, Batch(latents, PROMPTS), objective, prior_weight,
                             torch.Generator().manual_seed(seed))


def script_draws(pipe, latents, scheme: str, seed: int):
    """The scripts' noise, σ and timesteps, drawn from one generator in boothkit's order (noise, then u)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    u = compute_density_for_timestep_sampling(scheme, latents.shape[0], logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=g)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the scripts' noise_scheduler_copy
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]  # get_sigmas
    sigmas = sched.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    return noise, timesteps, sigmas


def script_loss(pred, target, sigmas, scheme: str, prior_weight: float):
    """The scripts' loss with prior preservation: each half's weighted per-example mean, then the sum."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    w, w_prior = torch.chunk(weighting, 2)
    pred, pred_prior = torch.chunk(pred, 2)
    target, target_prior = torch.chunk(target, 2)
    prior = torch.mean((w_prior.float() * (pred_prior.float() - target_prior.float()) ** 2)
                       .reshape(target_prior.shape[0], -1), 1).mean()
    inst = torch.mean((w.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    return inst + prior_weight * prior, inst, prior


def flux_reference(pipe, latents, scheme: str, seed: int, shift_mu=None):
    from diffusers import FluxPipeline

    noise, timesteps, sigmas = script_draws(pipe, latents, scheme, seed)
    if shift_mu is not None:  # FluxPipeline's resolution shift, as its scheduler applies it when sampling
        sigmas = pipe.scheduler.time_shift(shift_mu, 1.0, sigmas)
        timesteps = sigmas.flatten() * 1000
    b, c, h, w = latents.shape
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=32)
    guidance = torch.tensor([1.0]).expand(b)  # trained at guidance 1
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=img_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor,
                                        vae_scale_factor=pipe.vae_scale_factor)
    return script_loss(pred, noise - latents, sigmas, scheme, 1.0)


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "mode"])
def test_flux_loss_matches_the_diffusers_script(flux, scheme):
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = boothkit_loss(flux, latents, train_cfg(weighting_scheme=scheme, flow_shift="static"), seed=7)
    want = flux_reference(flux, latents, scheme, seed=7)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[1], ours[2])  # subject and class halves differ: the halves are compared


def test_flux_resolution_shift_is_the_pipelines(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = flux.scheduler.config
    mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    ours = boothkit_loss(flux, latents, train_cfg(), seed=3)  # auto: Flux's scheduler shifts by resolution
    want = flux_reference(flux, latents, "logit_normal", seed=3, shift_mu=mu)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    static = boothkit_loss(flux, latents, train_cfg(flow_shift="static"), seed=3)
    assert not torch.allclose(static[0], ours[0])


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
def test_sd3_loss_matches_the_diffusers_script(sd3, scheme):
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = boothkit_loss(sd3, latents, train_cfg(weighting_scheme=scheme), seed=5)
    noise, timesteps, sigmas = script_draws(sd3, latents, scheme, seed=5)
    assert sd3.scheduler.config.shift == 3.0 and float(timesteps.min()) > 1.0  # the static shift is the scheduler's
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    embeds, _, pooled, _ = sd3.encode_prompt(PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                             max_sequence_length=32)
    with torch.no_grad():
        pred = sd3.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
    want = script_loss(pred, noise - latents, sigmas, scheme, 1.0)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- a whole run

def images(pipe, seed=0):
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(seed), max_sequence_length=32)
    return out.images


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_lora_with_prior_preservation_loads_in_plain_diffusers(name, demo_subject, tmp_path):
    import diffusers

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["train", "--model", name, "--instance-dir", str(demo_subject), "--class-noun", "dog", "--output-dir",
              str(out), "--max-steps", "3", "--num-class-images", "2", "--class-steps", "2", "--learning-rate",
              "1e-2", "--mixed-precision", "no", "--train-text-encoder"])
    assert done.value.code in (0, None)
    assert len(list((out / "class_images").glob("*.png"))) == 2
    family = FLUX if name == "tiny-flux" else SD3
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(model_path(name))  # plain diffusers
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    pipe.load_lora_weights(str(out))
    adapters = pipe.get_list_adapters()
    assert set(adapters) == {"transformer", *family.trainable_encoders}, adapters
    assert not any(n.startswith("proj_out.") for n, _ in pipe.transformer.named_modules())  # Flux's final layer
    assert np.abs(images(pipe) - base).max() > 1e-3  # the LoRA changes the picture
    pipe.set_adapters(pipe.get_active_adapters(), [{c: 0.0 for c in adapters}])
    assert np.array_equal(images(pipe), base)  # and at scale 0 it is the base model exactly


# ------------------------------------------------------------------------------------------ refusals

def refused(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, said", [
    (["--model", "tiny-flux", "--method", "ti"], "lora.method (--method) ti: not supported for FLUX.1 models yet "
                                                 "(it is for SD 1.x/2.x, SDXL); FLUX.1 trains method lora, full"),
    (["--model", "tiny-sd3", "--snr-gamma", "5"], "train.snr_gamma (--snr-gamma): min-SNR weighting is for "
                                                  "diffusion models; SD3/3.5 learns rectified flow"),
    (["--model", "tiny", "--weighting-scheme", "cosmap"], "train.weighting_scheme (--weighting-scheme) cosmap: "
                                                          "applies to the flow-matching families"),
    (["--model", "tiny-flux", "--resolution", "72"], "--resolution 72: must be a multiple of 16 for FLUX.1 models"),
    (["--model", "tiny-sd3", "--resolution", "72"], "--resolution 72: must be a multiple of 16 for SD3/3.5 models"),
    (["--model", "tiny-sd3", "--flow-shift", "resolution"], "train.flow_shift (--flow-shift) resolution: this "
                                                            "model's scheduler shifts σ statically (shift 3)"),
])
def test_what_a_family_cannot_train_is_one_line(flags, said, demo_subject, tmp_path, capsys):
    err = refused(["train", *flags, "--instance-dir", demo_subject, "--class-noun", "dog", "--output-dir",
                   tmp_path / "o", "--no-prior", "--max-steps", 1], capsys)
    assert said in err
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_flux_samples_with_its_own_sampler_and_guidance(capsys, tmp_path):
    err = refused(["generate", "--model", "tiny-flux", "--prompt", "x", "--scheduler", "ddim", "--out", tmp_path / "g"],
                  capsys)
    assert err == "error: --scheduler ddim: FLUX.1 models sample with flow-euler"
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny-flux", "--prompt", "x", "-n", "1", "--steps", "2", "--out",
              str(tmp_path / "ok")])
    import tomllib

    saved = tomllib.loads((tmp_path / "ok" / "generate_config.toml").read_text())
    assert saved["generate"]["guidance"] == 3.5  # FLUX.1-dev's distilled guidance, the family's default


def test_single_files_say_their_family(tmp_path):
    one = torch.zeros(1)
    for keys, family in ((["double_blocks.0.img_attn.qkv.weight"], FLUX),
                         (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], FLUX),
                         (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], SD3)):
        save_file({k: one for k in keys}, tmp_path / "m.safetensors")
        assert family_of_single_file(tmp_path / "m.safetensors") is family
    save_file({"encoder.block.0.weight": one}, tmp_path / "t5.safetensors")
    with pytest.raises(ModelError, match="not a Stable Diffusion, SDXL, SD3 or FLUX.1 checkpoint"):
        family_of_single_file(tmp_path / "t5.safetensors")


# ----------------------------------------------------------------------------------- a quantized frozen base

def test_int8_base_trains_a_lora_that_plain_diffusers_loads(demo_subject, tmp_path, monkeypatch):
    """--quantize-base int8 (torchao weight-only, on the CPU): the frozen transformer and T5 are int8 while LoRA
    trains in fp32 on top; the saved LoRA is an ordinary one, which plain FluxPipeline loads on its bf16 base."""
    import diffusers

    import boothkit.train.loop as T

    seen = {}
    real = T.training_step

    def spy(family, model, *a, **k):
        layer = model.transformer_blocks[0].attn.to_q
        seen.update(base=type(layer.base_layer.weight).__name__, lora=layer.lora_A["default"].weight.dtype)
        return real(family, model, *a, **k)

    monkeypatch.setattr(T, "training_step", spy)
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as done:
        main(["train", "--model", "tiny-flux", "--instance-dir", str(demo_subject), "--class-noun", "dog",
              "--output-dir", str(out), "--max-steps", "2", "--num-class-images", "2", "--class-steps", "2",
              "--learning-rate", "1e-2", "--quantize-base", "int8", "--mixed-precision", "bf16"])
    assert done.value.code in (0, None)
    assert seen["base"] == "Int8Tensor" and seen["lora"] == torch.float32
    pipe = diffusers.FluxPipeline.from_pretrained(model_path("tiny-flux"))
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(images(pipe) - base).max() > 1e-3


def test_int8_base_predicts_what_the_full_precision_one_does(flux):
    from boothkit.models.quantize import is_quantized

    q = load_pipeline("tiny-flux", quantize="int8")
    layer = q.transformer.transformer_blocks[0].attn.to_q
    assert is_quantized(q.transformer) and is_quantized(q.text_encoder_2) and not is_quantized(q.text_encoder)
    assert type(layer.weight).__name__ == "Int8Tensor"
    cond = FLUX.encode([flux.text_encoder, flux.text_encoder_2], FLUX.tokenize([flux.tokenizer, flux.tokenizer_2], "a dog"))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = FLUX.denoise(flux.transformer, x, torch.tensor([500.0]), cond)
        int8 = FLUX.denoise(q.transformer, x, torch.tensor([500.0]), cond)
    assert 0 < (int8 - full).abs().max() < 0.05 * full.abs().max()  # rounded weights, the same model


# ------------------------------------------------------------------------------ the other methods of the matrix

@pytest.mark.parametrize("flags", [["--adapter", "dora"], ["--adapter", "lokr"], ["--adapter", "loha"],
                                   ["--method", "full"]])
def test_flux_trains_every_method_it_lists_and_generation_reads_it(flags, demo_subject, tmp_path):
    from boothkit.generate.generation import generate_images, load_generation_pipeline, set_lora_scales

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["train", "--model", "tiny-flux", "--instance-dir", str(demo_subject), "--class-noun", "dog",
              "--output-dir", str(out), "--max-steps", "2", "--no-prior", "--learning-rate", "5e-2",
              "--mixed-precision", "no", *flags])
    assert done.value.code in (0, None)
    kw = dict(num_images=1, seed=0, steps=2, guidance=3.5)
    base = np.asarray(generate_images(load_generation_pipeline("tiny-flux", []), "a photo of sks dog", **kw)[0])
    if "full" in flags:  # a whole FluxPipeline folder
        pipe = load_generation_pipeline(str(out / "model"), [])
    else:
        pipe = load_generation_pipeline(None, [(str(out), 1.0)])  # the base model from the LoRA's metadata
    pipe.set_progress_bar_config(disable=True)
    assert np.abs(np.asarray(generate_images(pipe, "a photo of sks dog", **kw)[0], np.int16) - base).max() > 0
    if "full" not in flags and "dora" not in flags:  # DoRA's trained magnitudes act at any scale
        set_lora_scales(pipe, 0.0, 0.0)
        assert np.array_equal(np.asarray(generate_images(pipe, "a photo of sks dog", **kw)[0]), base)


def test_a_hub_id_loads_as_the_family_its_model_index_names(monkeypatch):
    """No hub here: the hub's download answers with the tiny-sd3 folder, as a snapshot would."""
    import diffusers

    asked = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "download",
                        lambda spec, **kw: asked.append(("download", spec)) or str(model_path("tiny-sd3")))
    real = diffusers.StableDiffusion3Pipeline.from_pretrained.__func__

    def from_folder(cls, folder, **kw):
        asked.append(("weights", folder, kw.get("quantization_config") is not None))
        return real(cls, folder, **kw)

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", classmethod(from_folder))
    pipe = load_pipeline("stabilityai/stable-diffusion-3.5-medium", quantize="int8")
    assert family_of(pipe) is SD3
    assert asked == [("download", "stabilityai/stable-diffusion-3.5-medium"),
                     ("weights", str(model_path("tiny-sd3")), True)]


def test_the_memory_estimate_counts_the_loaded_model_exactly():
    """The rows that are counted, not modelled, equal the loaded tiny-flux's own numbers."""
    from boothkit.adapters.inject import add_lora
    from boothkit.models.memory import run_estimate

    pipe = load_pipeline("tiny-flux")
    base = sum(p.numel() for p in pipe.transformer.parameters())
    add_lora(pipe.transformer, FLUX.lora_targets, 4, 4.0, exclude=FLUX.lora_exclude)
    lora = sum(p.numel() for p in pipe.transformer.parameters() if p.requires_grad)
    est = run_estimate(pipe, FLUX, resolution=64, batch_size=1, rank=4, precision="no", quantize=None,
                       gradient_checkpointing=False, prior=True, cache=True)
    assert est.rows[0][1] == base * 4 and est.row("LoRA weights (fp32)") == lora * 4
    assert est.row("optimizer states (adamw)") == lora * 8 and est.row("activations") > 0
    assert run_estimate(load_pipeline("tiny"), family_of(load_pipeline("tiny")), resolution=64, batch_size=1, rank=4,
                        precision="no", quantize=None, gradient_checkpointing=False, prior=True, cache=True) is None


def test_flux_resumes_bit_for_bit_with_ema(demo_subject, tmp_path):
    """Checkpoints, the resume fingerprint, EMA and the draws of every step go through the seam: a run resumed from
    its step-1 checkpoint to step 3 saves what an uninterrupted run of 3 does."""
    from safetensors.torch import load_file

    def train(out, steps, *more):
        with pytest.raises(SystemExit) as done:
            main(["train", "--model", "tiny-flux", "--instance-dir", str(demo_subject), "--class-noun", "dog",
                  "--output-dir", str(out), "--max-steps", str(steps), "--num-class-images", "2", "--class-steps",
                  "2", "--class-dir", str(tmp_path / "class"), "--mixed-precision", "no", "--checkpoint-every", "1",
                  "--ema-decay", "0.9", "--weighting-scheme", "cosmap", *more])
        assert done.value.code in (0, None)
        return load_file(out / "pytorch_lora_weights.safetensors")

    whole = train(tmp_path / "whole", 3)
    train(tmp_path / "cut", 2)
    resumed = train(tmp_path / "cut", 3, "--resume")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_folder_of_another_pipeline_or_without_its_transformer_is_one_line(tmp_path, capsys):
    import json
    import shutil

    other = tmp_path / "qwen"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    args = ["generate", "--prompt", "x", "--out", tmp_path / "g", "--model"]
    assert refused([*args, other], capsys) == (
        f"error: --model {other}: a QwenImagePipeline model; boothkit trains SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 "
        "(StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)")
    partial = tmp_path / "flux"
    shutil.copytree(model_path("tiny-flux"), partial, ignore=shutil.ignore_patterns("transformer"))
    assert refused([*args, partial], capsys) == (f"error: --model {partial}: the model folder lacks transformer/ "
                                                 "(copy the whole diffusers folder)")


def test_the_prior_effect_bench_measures_drift_through_the_family(flux, sd3):
    """bench prior-effect's class drift: the family noises, encodes and calls the denoiser (any family)."""
    from boothkit.evaluate.prior_effect import denoiser_outputs

    for pipe, channels in ((flux, 16), (sd3, 16)):
        latents = torch.randn(3, channels, 8, 8, generator=torch.Generator().manual_seed(0))
        noise, t = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 500, 900])
        a = denoiser_outputs(pipe, "a photo of dog", latents, noise, t, batch=2)
        b = denoiser_outputs(pipe, "a photo of cat", latents, noise, t)
        assert a.shape == latents.shape and torch.isfinite(a).all() and not torch.allclose(a, b)


def test_embeddings_are_refused_for_a_family_without_textual_inversion(flux, tmp_path):
    from boothkit.adapters.embeddings import load_embeddings
    from boothkit.core.errors import BoothkitError

    save_file({"clip_l": torch.zeros(1, 16)}, tmp_path / "e.safetensors")
    with pytest.raises(BoothkitError, match="learned embeddings are not supported for FLUX.1 models yet"):
        load_embeddings(flux, FLUX, tmp_path / "e.safetensors", "sks")


def test_a_flux_model_without_a_guidance_embedding_draws_with_true_cfg(flux, tmp_path):
    """FLUX.1-schnell's layout (and mini-flow's): guidance_scale would be ignored; above 1 boothkit asks FluxPipeline
    for true classifier-free guidance, and a model's marker may name the guidance it draws with."""
    import json
    import shutil

    from boothkit.generate.generation import generate_images

    assert FLUX.guidance_kwargs(flux, 3.5, "blurry", 2) == {"guidance_scale": 3.5}  # dev: the embedding
    assert FLUX.guidance_of(flux) == 3.5 and not FLUX.reads_negative_prompts(flux)
    folder = tmp_path / "schnell-like"
    shutil.copytree(model_path("tiny-flux"), folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert FLUX.guidance_of(pipe) == 1.0 and FLUX.reads_negative_prompts(pipe)
    assert FLUX.guidance_kwargs(pipe, 1.0, "", 2) == {}
    assert FLUX.guidance_kwargs(pipe, 4.0, "", 2) == {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    kw = dict(num_images=1, seed=0, steps=2)
    plain, cfg = (np.asarray(generate_images(pipe, "a dog", guidance=g, **kw)[0], np.int16) for g in (1.0, 4.0))
    assert np.abs(plain - cfg).max() > 0
    marker = json.loads((folder / "BOOTHKIT_TINY.json").read_text())
    (folder / "BOOTHKIT_TINY.json").write_text(json.dumps({**marker, "guidance": 5}))
    assert FLUX.guidance_of(load_pipeline(str(folder))) == 5.0


def test_each_pass_of_a_bucketed_batch_gets_its_own_resolution_shift(flux):
    """A bucketed subject half (here 8x16 latents) and the square class half (8x8) are shifted for their own token
    counts, from one draw of u: as FluxPipeline would sample each size."""
    objective = flow_objective(flux.scheduler, train_cfg())
    parts = [(2, (8, 16)), (2, (8, 8))]
    both = objective.timesteps(parts, torch.Generator().manual_seed(0))
    each = [objective.timesteps([(4, grid)], torch.Generator().manual_seed(0)) for _, grid in parts]
    torch.testing.assert_close(both, torch.cat([each[0][:2], each[1][2:]]))
    assert not torch.allclose(each[0], each[1])  # 32 and 16 tokens: different shifts
