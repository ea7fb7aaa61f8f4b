"""The training loop on the tiny model: outputs, caching equivalence, kill-and-resume, prediction types."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.train.losses import add_noise
from boothkit.models.families import SD, Conditioning
from boothkit.train.objectives import DiffusionObjective
from boothkit.adapters.lora import LORA_FILE
from boothkit.models.loading import load_pipeline
from boothkit.train.batches import Batch
from boothkit.generate.generation import parse_parameters
from boothkit.train.loop import run_training, training_step
from processes import kill_at, paused


@pytest.fixture
def class_dir(tmp_path):
    """Four class images 'the user put there' (accepted as they are, nothing generated)."""
    d = tmp_path / "class"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"user_{i}.png")
    return d


def make_cfg(instance_dir, out, class_dir=None, **over):
    values = {"instance_dir": str(instance_dir), "class_noun": "dog", "output_dir": str(out), "max_steps": 4,
              "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "text_encoder_lr": 1e-3}
    if class_dir is None:
        values["prior"] = False
    else:
        values.update(class_dir=str(class_dir), num_class_images=4, class_batch_size=2)
    values.update(over)
    return C.resolve(C.TRAIN_SECTIONS, {}, values)


def lora_tensors(out):
    return load_file(Path(out) / LORA_FILE)


@pytest.mark.slow
def test_outputs_and_metadata(instance_dir, class_dir, tmp_path):
    out = run_training(make_cfg(instance_dir, tmp_path / "out", class_dir, train_text_encoder=True), progress=False)
    w = lora_tensors(out)
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in w)
    te_keys = [k for k in w if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k), "training moved the LoRA up-projections"
    with safe_open(str(out / LORA_FILE), "pt") as fh:
        meta = fh.metadata()
    for key in ("base_model", "token", "class_noun", "instance_prompt", "rank", "alpha", "unet_targets", "steps",
                "version"):
        assert f"boothkit.{key}" in meta
    assert meta["boothkit.instance_prompt"] == "a photo of sks dog"
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["text_encoder.lora_alpha"] == 4.0
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,instance_loss,prior_loss,lr,text_encoder_lr" and len(rows) == 5
    assert float(rows[1].split(",")[3]) > 0, "prior loss is logged"
    saved = C.resolve(C.TRAIN_SECTIONS, C.load_toml(out / "config.toml"))
    assert saved.data.resolution == 64 and saved.prior.class_dir == str(class_dir)


@pytest.mark.slow
def test_plain_diffusers_loads_the_lora(instance_dir, tmp_path, tiny_path):
    from diffusers import StableDiffusionPipeline

    out = run_training(make_cfg(instance_dir, tmp_path / "out", train_text_encoder=True), progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    base = pipe("a photo of sks dog", **kw).images
    pipe.load_lora_weights(out)
    # the text-encoder part is applied, not silently dropped: its weights are the file's
    saved = lora_tensors(out)
    q = dict(pipe.text_encoder.named_modules())["encoder.layers.0.self_attn.q_proj"]
    adapter = next(iter(q.lora_B))
    assert torch.equal(q.lora_B[adapter].weight, saved["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"])
    kw["generator"] = torch.Generator("cpu").manual_seed(0)
    tuned = pipe("a photo of sks dog", **kw).images
    assert not (base == tuned).all()


@pytest.mark.slow
def test_cached_and_uncached_latents_give_same_weights(instance_dir, class_dir, tmp_path):
    cached = run_training(make_cfg(instance_dir, tmp_path / "a", class_dir, flip=True), progress=False)
    uncached = run_training(make_cfg(instance_dir, tmp_path / "b", class_dir, flip=True, cache_latents=False),
                            progress=False)
    a, b = lora_tensors(cached), lora_tensors(uncached)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the VAE encodes one picture at a time either way
    other_seed = lora_tensors(run_training(make_cfg(instance_dir, tmp_path / "c", class_dir, flip=True, seed=1),
                                           progress=False))
    assert any(not torch.allclose(a[k], other_seed[k]) for k in a), "the seed matters"


def _cli(*args):
    return [sys.executable, "-m", "boothkit", "train", *map(str, args)]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(instance_dir, class_dir, tmp_path):
    common = ["--instance-dir", instance_dir, "--class-noun", "dog", "--class-dir", class_dir,
              "--num-class-images", 4, "--max-steps", 30, "--checkpoint-every", 4, "--checkpoints-keep", 2,
              "--rank", 4, "--learning-rate", 1e-3, "--train-text-encoder", "--flip", "--dropout", 0.1,
              "--log-every", 7]  # the log and checkpoint cadences differ: the resumed log must still be whole
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_cli(*common, "--output-dir", tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    cmd, extra = paused(["train", *common, "--output-dir", out], "boothkit.train.loop:_after_step:8", tmp_path / "held")
    kill_at(cmd, tmp_path / "held", {**env, **extra})  # killed right after step 8 and its checkpoint
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004", "step-0000008"]
    assert not (out / LORA_FILE).exists()
    resumed = subprocess.run(_cli(*common, "--output-dir", out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = lora_tensors(tmp_path / "full"), lora_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(kept) == 2 and all(p.startswith("step-") for p in kept)
    log = (out / "train_log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == list(range(1, 31))


class ZeroUNet(torch.nn.Module):
    """Predicts zeros, so the loss is the mean square of the target itself."""

    class Out:
        def __init__(self, sample):
            self.sample = sample

    def forward(self, noisy, t, encoder_hidden_states):
        return self.Out(torch.zeros_like(noisy))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_prediction_type(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    batch = Batch(latents, ["a", "b"])
    loss, inst, prior = training_step(SD, ZeroUNet(), lambda p: Conditioning(torch.zeros(len(p), 77, 8), None),
                                      batch, DiffusionObjective(sched.alphas_cumprod, prediction_type), None,
                                      torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # replay the step's draws
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    assert loss.item() == pytest.approx((target ** 2).mean().item(), rel=1e-5)
    assert torch.allclose(add_noise(latents, noise, sched.alphas_cumprod, t), sched.add_noise(latents, noise, t),
                          atol=1e-6)


@pytest.mark.slow
def test_v_prediction_model_trains(instance_dir, tmp_path, tiny_path, monkeypatch):
    vmodel = tmp_path / "tiny-v"
    shutil.copytree(tiny_path, vmodel)
    sched = json.loads((vmodel / "scheduler" / "scheduler_config.json").read_text())
    sched["prediction_type"] = "v_prediction"
    (vmodel / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    import boothkit.train.objectives as T  # the diffusion objective asks for the target

    targets = []
    real = T.diffusion_target
    monkeypatch.setattr(T, "diffusion_target", lambda kind, *a: targets.append(kind) or real(kind, *a))
    out = run_training(make_cfg(instance_dir, tmp_path / "out", model=str(vmodel), max_steps=2), progress=False)
    eps = run_training(make_cfg(instance_dir, tmp_path / "eps", max_steps=2), progress=False)
    assert targets == ["v_prediction"] * 2 + ["epsilon"] * 2  # the model's own config picks the target
    first = [float((o / "train_log.csv").read_text().splitlines()[1].split(",")[1]) for o in (out, eps)]
    assert first[0] != first[1]  # same seeds, same base weights: only the target differs
    assert json.loads(safe_open(str(out / LORA_FILE), "pt").metadata()["lora_adapter_metadata"])["unet.r"] == 4


@pytest.mark.slow
def test_full_finetune_writes_a_diffusers_model(instance_dir, tmp_path, tiny_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out = run_training(make_cfg(instance_dir, tmp_path / "out", full=True, train_text_encoder=True, max_steps=2,
                                learning_rate=1e-4, text_encoder_lr=1e-4), progress=False)

    def changed(a, b):
        return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    assert changed(UNet2DConditionModel.from_pretrained(out / "model" / "unet"),
                   UNet2DConditionModel.from_pretrained(tiny_path / "unet"))
    assert changed(CLIPTextModel.from_pretrained(out / "model" / "text_encoder"),
                   CLIPTextModel.from_pretrained(tiny_path / "text_encoder"))
    assert not (out / LORA_FILE).exists()


@pytest.mark.slow
def test_random_crop_trains_without_a_latent_cache(tmp_path):
    """Random crops differ every step, so nothing is cached; wide photos exercise the crop offsets."""
    photos = tmp_path / "wide"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (160, 64), (40 * i, 90, 200)).save(photos / f"{i}.png")
    from boothkit.train.batches import LatentBank

    vae = load_pipeline("tiny").vae
    bank = LatentBank([Image.open(p) for p in sorted(photos.iterdir())], 64, vae, prompts=["x"] * 3, cache=True,
                      flip=False, random_crop=True, device="cpu")
    assert not bank.cache  # a random crop differs every step: nothing to cache
    idx = torch.zeros(1, dtype=torch.long)
    crops = {tuple(bank.sample(idx, torch.Generator().manual_seed(s))[1][0].tolist()) for s in range(8)}
    assert len(crops) > 2  # the crop's offset (in the micro-conditioning ids) moves from draw to draw
    a = run_training(make_cfg(photos, tmp_path / "a", crop="random", flip=True, max_steps=2), progress=False)
    again = run_training(make_cfg(photos, tmp_path / "b", crop="random", flip=True, max_steps=2), progress=False)
    center = run_training(make_cfg(photos, tmp_path / "c", flip=True, max_steps=2), progress=False)
    wa, wb, wc = lora_tensors(a), lora_tensors(again), lora_tensors(center)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the crops come from the step's seed: a rerun repeats them"
    assert any(not torch.equal(wa[k], wc[k]) for k in wa), "random crops train on other pixels than the centre crop"


@pytest.mark.slow
def test_bf16_accumulation_and_schedule(instance_dir, tmp_path, monkeypatch):
    import boothkit.train.loop as T

    micro = []
    real = T.training_step
    monkeypatch.setattr(T, "training_step", lambda *a, **k: (lambda r: micro.append(float(r[0].detach())) or r)(real(*a, **k)))
    out = run_training(make_cfg(instance_dir, tmp_path / "out", mixed_precision="bf16", max_steps=3,
                                gradient_accumulation_steps=2, lr_scheduler="linear", lr_warmup_steps=1,
                                gradient_checkpointing=True), progress=False)
    rows = [r.split(",") for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert len(micro) == 6  # two micro-batches per optimizer step
    logged = [float(r[1]) for r in rows]
    assert logged == pytest.approx([(micro[i] + micro[i + 1]) / 2 for i in (0, 2, 4)], rel=1e-5)  # their mean
    assert [float(r[4]) for r in rows] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-12)  # 1 warm-up step, then linear


@pytest.mark.slow
def test_gradient_checkpointing_changes_memory_not_the_weights(instance_dir, tmp_path, monkeypatch):
    import boothkit.train.trainer as TR

    on = []
    release = TR.release_frozen
    monkeypatch.setattr(TR, "release_frozen", lambda tr: (on.append(tr.pipe.unet.is_gradient_checkpointing),
                                                          release(tr)))
    plain = run_training(make_cfg(instance_dir, tmp_path / "a", max_steps=2), progress=False)
    ckpt = run_training(make_cfg(instance_dir, tmp_path / "b", max_steps=2, gradient_checkpointing=True),
                        progress=False)
    assert on == [False, True]
    wa, wb = lora_tensors(plain), lora_tensors(ckpt)
    for k in wa:  # the recomputed forward is the same forward (its RNG state is replayed)
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-7)


@pytest.mark.slow
def test_compiled_unet_trains_the_same_weights(instance_dir, tmp_path, monkeypatch):
    """--compile: the same weights under the same names, also through the frozen-model prior (adapters switched off
    inside the compiled UNet) and validation sampling. The aot_eager backend traces and differentiates as inductor
    does without its C++ code generation (80 s for tiny on this CPU); BOOTHKIT_TEST_COMPILE_BACKEND=inductor runs
    this test with inductor itself (BENCHMARKS.md gives its measured difference and times it)."""
    import boothkit.train.trainer as TR

    real, backend = torch.nn.Module.compile, os.environ.get("BOOTHKIT_TEST_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, **{"backend": backend, **kw}))
    compiled = []
    release = TR.release_frozen
    monkeypatch.setattr(TR, "release_frozen", lambda tr: (compiled.append(tr.pipe.unet._compiled_call_impl),
                                                          release(tr)))
    over = {"max_steps": 3, "prior_target": "frozen", "prior_images": "subject", "validate_every": 3,
            "validation_steps": 2}
    plain = run_training(make_cfg(instance_dir, tmp_path / "a", prior=True, **over), progress=False)
    fast = run_training(make_cfg(instance_dir, tmp_path / "b", prior=True, compile=True, **over), progress=False)
    assert compiled[0] is None and compiled[1] is not None
    wa, wb = lora_tensors(plain), lora_tensors(fast)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"--compile ({backend}): largest LoRA weight difference {worst:.2e}")
    # lora_B moves by ~1e-3 in these steps, so a lost op shows. Inductor fuses and reorders float sums: measured
    # 4.1e-6 (AMD EPYC, 2026-12-07), where aot_eager keeps eager's order (measured 0.0)
    atol = 1e-5 if backend == "inductor" else 1e-6
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol)


@pytest.mark.slow
def test_validation_samples(instance_dir, tmp_path):
    out = run_training(make_cfg(instance_dir, tmp_path / "out", max_steps=2, validate_every=2, validation_steps=2),
                       progress=False)
    folder = out / "validation" / "step-0000002"
    assert (folder / "grid.png").is_file() and len(list(folder.glob("0*.png"))) == 6
    # every picture carries the full parameters (issue 31): what drew it, with which weights, seed and size
    with Image.open(folder / "01-1.png") as im:
        p = parse_parameters(im.text["parameters"])
    assert (p["Seed"], p["Steps"], p["Size"], p["Model"], p["Device"]) == ("1", "2", "64x64", "tiny", "cpu")
    assert p["Sampler"] and p["Precision"] == "float32" and p["Weights"] == f"{out} at step 2 (validation)"
    with Image.open(folder / "grid.png") as im:
        grid = parse_parameters(im.text["parameters"])
    assert grid["Seeds"] == "0-1" and "Seed" not in grid and len(grid["prompt"].split("\n")) == 3


@pytest.mark.slow
def test_two_processes_under_torchrun_train_what_one_process_does_with_accumulation_2(instance_dir, tmp_path):
    """Data-parallel training on CPU (gloo); on GPUs the same code runs under `accelerate launch`. Two processes
    draw the global micro-batches that one process with --gradient-accumulation-steps 2 draws, so averaging the
    gradients and the logged loss over processes must give that run's losses and weights (up to summation order)."""
    common = ["train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--max-steps", "3", "--rank", "2",
              "--learning-rate", "1e-2", "--log-every", "1", "--mixed-precision", "no", "--num-class-images", "4",
              "--class-steps", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           "-m", "boothkit", *common, "--output-dir", str(tmp_path / "ddp"), "--class-dir",
                           str(tmp_path / "cls")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training on 2 process(es)" in proc.stderr
    one = subprocess.run([sys.executable, "-m", "boothkit", *common, "--gradient-accumulation-steps", "2",
                          "--output-dir", str(tmp_path / "one"), "--class-dir", str(tmp_path / "cls")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    logs = [[[float(x) for x in r.split(",")[1:4]] for r in (tmp_path / name / "train_log.csv").read_text().splitlines()[1:]]
            for name in ("ddp", "one")]
    assert len(logs[0]) == 3 and np.allclose(logs[0], logs[1], rtol=1e-4, atol=1e-6), logs
    a, b = (load_file(tmp_path / name / LORA_FILE) for name in ("ddp", "one"))
    assert a.keys() == b.keys()
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-4, moved
    # the check can fail: rank 0's gradient alone (no averaging) trains other weights
    solo = subprocess.run([sys.executable, "-m", "boothkit", *common, "--output-dir", str(tmp_path / "solo"),
                           "--class-dir", str(tmp_path / "cls")], env=env, capture_output=True, text=True, timeout=300)
    assert solo.returncode == 0, solo.stderr[-2000:]
    c = load_file(tmp_path / "solo" / LORA_FILE)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 100 * max(moved, 1e-7)


@pytest.mark.slow
def test_frozen_prior_target_anchors_the_class_to_the_frozen_model(instance_dir, class_dir, tmp_path):
    """With the frozen model's prediction as the class target, step 1's prior loss is 0 up to kernel rounding
    (LoRA B starts at 0, so the trained and the frozen model agree); it grows only as far as training moves the class."""
    out = run_training(make_cfg(instance_dir, tmp_path / "out", class_dir, prior_target="frozen", max_steps=4,
                                train_text_encoder=True), progress=False)
    rows = [r.split(",") for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    prior = [float(r[3]) for r in rows]
    instance = [float(r[2]) for r in rows]
    assert prior[0] < 1e-10 and instance[0] > 0.1
    assert 0 < max(prior[1:]) < 0.1 * min(instance)
    paper = run_training(make_cfg(instance_dir, tmp_path / "paper", class_dir, max_steps=1), progress=False)
    assert float((paper / "train_log.csv").read_text().splitlines()[1].split(",")[3]) > 0.1


def test_frozen_prior_target_needs_lora(instance_dir, tmp_path):
    from boothkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="prior.prior_target frozen needs LoRA"):
        run_training(make_cfg(instance_dir, tmp_path / "o", tmp_path, prior_target="frozen", full=True))


@pytest.mark.slow
def test_prior_from_subject_pictures_needs_no_class_images(instance_dir, tmp_path):
    """--prior-images subject: the class prompt on the subject's own latents, anchored to the frozen model's
    prediction; nothing is generated, and the prior term still moves the weights (unlike no prior at all)."""
    from boothkit.core.errors import ConfigError

    out = run_training(make_cfg(instance_dir, tmp_path / "out", tmp_path / "unused", prior=True,
                                prior_target="frozen", prior_images="subject", max_steps=4), progress=False)
    assert not (tmp_path / "unused").exists() and not (out / "class_images").exists()
    prior = [float(r.split(",")[3]) for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert prior[0] < 1e-10 and max(prior[1:]) > 0
    with safe_open(str(out / LORA_FILE), "pt") as fh:
        assert fh.metadata()["boothkit.prior_images"] == "subject"
    plain = run_training(make_cfg(instance_dir, tmp_path / "plain", max_steps=4), progress=False)
    a, b = lora_tensors(out), lora_tensors(plain)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="prior.prior_images subject needs prior.prior_target frozen"):
        run_training(make_cfg(instance_dir, tmp_path / "o", tmp_path, prior_images="subject"))


@pytest.mark.slow
def test_nan_loss_stops_at_once_and_keeps_the_checkpoint(instance_dir, tmp_path, monkeypatch):
    """A non-finite loss ends the run with a message naming the step, before the optimizer steps on it; the
    checkpoint written before stays, and --resume finishes the run from it."""
    from boothkit.train import loop as T
    from boothkit.core.errors import BoothkitError

    real, calls = T.training_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, inst, prior = real(*args, **kwargs)
        return (loss * float("nan"), inst, prior) if len(calls) == 3 else (loss, inst, prior)

    monkeypatch.setattr(T, "training_step", poisoned)
    cfg = make_cfg(instance_dir, tmp_path / "out", max_steps=6, checkpoint_every=2)
    with pytest.raises(BoothkitError, match=r"step 3: the loss is nan .* checkpoint at step 2 is kept"):
        run_training(cfg, progress=False)
    assert not (tmp_path / "out" / LORA_FILE).exists()
    monkeypatch.setattr(T, "training_step", real)
    out = run_training(cfg.replace("train", resume=True), progress=False)
    assert all(torch.isfinite(v).all() for v in lora_tensors(out).values())


@pytest.mark.slow
@pytest.mark.parametrize("over, released", [
    ({}, {"vae", "text_encoder"}),  # latents and prompts cached: neither is needed again
    ({"validate_every": 2}, set()),  # validation samples need both
    ({"train_text_encoder": True}, {"vae"}),  # the text encoder trains
    ({"cache_latents": False}, set()),  # pictures and prompts are encoded every step
])
def test_lora_loads_frozen_weights_in_the_run_precision_and_releases_what_it_no_longer_needs(
        instance_dir, class_dir, tmp_path, monkeypatch, over, released):
    import boothkit.train.trainer as TR

    seen = {}
    release = TR.release_frozen
    monkeypatch.setattr(TR, "release_frozen", lambda tr: (seen.update(
        unet=next(p for n, p in tr.pipe.unet.named_parameters() if "lora" not in n).dtype,
        vae=tr.pipe.vae.dtype), release(tr), seen.update(tr=tr)))
    out = run_training(make_cfg(instance_dir, tmp_path / "o", class_dir, mixed_precision="bf16", max_steps=2, **over),
                       progress=False)
    assert seen["unet"] == torch.bfloat16 and seen["vae"] == torch.float32  # loaded so, never held in fp32
    pipe = seen["tr"].pipe
    on_meta = {name for name in ("vae", "text_encoder") if next(getattr(pipe, name).parameters()).is_meta}
    assert on_meta == released
    assert (out / LORA_FILE).is_file()


@pytest.mark.slow
def test_full_finetune_keeps_fp32_master_weights_and_its_vae(instance_dir, tmp_path, monkeypatch):
    import boothkit.train.trainer as TR

    seen = {}
    release = TR.release_frozen
    monkeypatch.setattr(TR, "release_frozen", lambda tr: (release(tr), seen.update(tr=tr)))
    run_training(make_cfg(instance_dir, tmp_path / "o", full=True, mixed_precision="bf16", max_steps=1),
                 progress=False)
    pipe = seen["tr"].pipe
    assert next(pipe.unet.parameters()).dtype == torch.float32 and not next(pipe.vae.parameters()).is_meta


@pytest.mark.parametrize("over, last", [({}, LORA_FILE), ({"method": "ti"}, "learned_embeds.safetensors"),
                                        ({"method": "full"}, "model"), ({"full": True}, "model")])
def test_train_once_reuses_a_finished_run_by_the_file_it_writes_last(instance_dir, tmp_path, monkeypatch, over, last):
    import boothkit.train.loop as T

    cfg = make_cfg(instance_dir, tmp_path / "out", **over)
    assert T.final_output(cfg) == tmp_path / "out" / last
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / last).touch()
    monkeypatch.setattr(T, "run_training", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert T.train_once(cfg) == tmp_path / "out"
