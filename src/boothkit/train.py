"""The DreamBooth training loop: LoRA (or full) fine-tuning with the prior-preservation loss, via accelerate.

Every random draw of optimizer step s (which photos, flips, VAE sample, noise, timesteps, dropout) comes
from a seed derived from (seed, s, global micro-batch index). Nothing depends on how many steps ran
before in this process, so a resumed run repeats an uninterrupted one bit for bit, cached and uncached
latents see the same draws, and N processes train what one process does with N-fold accumulation.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from . import checkpoint as ckpt
from .config import RunConfig, fill, save_toml, validate_train
from .batches import Batch, LatentBank, PromptEncoder, draw_batch, step_seed
from .data import aspect_buckets, load_folder, load_image
from . import ema, tokens
from .errors import BoothkitError, ConfigError, Interrupted
from .files import atomic_write_bytes, check_free_space
from .embeddings import Placeholder, add_placeholder, learned, save_embeddings, train_rows
from .interrupts import deferred_stop
from .locks import folder_lock
from .families import Family, family_of
from .losses import (add_noise, diffusion_target, example_mse, examples_loss, min_snr_weights, mse,
                     prior_preservation_loss, weighted_loss)
from .sidecars import Sidecars, read_sidecars
from .lora import (LORA_FILE, adapter_metadata, add_lora, adapters_disabled, canonical_text_encoder_keys,
                   lora_state_dict, save_lora_file)
from .models import load_pipeline, model_name, model_ref, native_resolution

log = logging.getLogger("boothkit")
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # frozen weights per precision
LOG_FIELDS = ("step", "loss", "instance_loss", "prior_loss", "lr", "text_encoder_lr")


# ------------------------------------------------------------------------------------------- the step

def training_step(unet, encode: Callable, batch: Batch, alphas_cumprod: torch.Tensor, prediction_type: str,
                  prior_weight: float | None, g: torch.Generator, frozen_predict: Callable | None = None,
                  snr_gamma: float | None = None, noise_offset: float = 0.0):
    """One forward pass over [subject; class] examples -> (loss, instance_loss, prior_loss).

    With `frozen_predict` (--prior-target frozen) the class examples' target is the frozen model's own
    prediction for the same noisy latents and prompt, instead of the noise that was added. `snr_gamma`: min-SNR-γ
    weights per example; `noise_offset`: offset noise; `batch.masks`: the subject examples' loss masks.
    A bucketed batch's subject and class examples (`batch.latents` a pair) take one pass each.
    """
    parts = batch.latents if isinstance(batch.latents, tuple) else (batch.latents,)
    device = parts[0].device
    noises = [torch.randn(x.shape, generator=g).to(device) for x in parts]
    timesteps = torch.randint(0, len(alphas_cumprod), (sum(len(x) for x in parts),), generator=g).to(device)
    if noise_offset:  # drawn last: with 0 (no draw) the noise and timesteps are a plain run's, bit for bit
        noises = [e + noise_offset * torch.randn(e.shape[:2] + (1,) * (e.ndim - 2), generator=g).to(device)
                  for e in noises]
    time_ids = None if batch.time_ids is None else batch.time_ids.to(device)
    noisy, preds, targets, start = [], [], [], 0
    for x, e in zip(parts, noises):
        at, start = slice(start, start + len(x)), start + len(x)
        noisy.append(add_noise(x, e, alphas_cumprod, timesteps[at]))
        kwargs = encode(batch.prompts[at]).unet_kwargs(None if time_ids is None else time_ids[at])
        preds.append(unet(noisy[-1], timesteps[at], **kwargs).sample)
        targets.append(diffusion_target(prediction_type, x, e, alphas_cumprod, timesteps[at]))
    if prior_weight is not None and frozen_predict is not None:
        n = len(timesteps) // 2  # the class examples: the last n of the last pass
        with torch.no_grad():
            frozen = frozen_predict(noisy[-1][-n:], timesteps[n:], batch.prompts[n:],
                                    None if time_ids is None else time_ids[n:])
        targets[-1] = torch.cat([targets[-1][:-n], frozen.to(targets[-1].dtype)])
    weights = None if snr_gamma is None else min_snr_weights(alphas_cumprod, timesteps, snr_gamma, prediction_type)
    if len(parts) == 2:  # the loss is still each half's mean over its examples, as in one pass
        per = torch.cat([example_mse(preds[0], targets[0], batch.masks), example_mse(preds[1], targets[1])])
        return examples_loss(per, weights, prior_weight)
    pred, target = preds[0], targets[0]
    if snr_gamma is not None or batch.masks is not None:
        return weighted_loss(pred, target, weights, batch.masks, prior_weight)
    if prior_weight is None:
        loss = mse(pred, target)
        return loss, loss, torch.zeros_like(loss)
    return prior_preservation_loss(pred, target, prior_weight)


# ------------------------------------------------------------------------------------------------ setup

def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _make_optimizer(cfg: RunConfig, groups: list[dict]):
    t = cfg.train
    kind = t.optimizer
    if kind in ("auto", "adamw8bit"):
        try:
            import bitsandbytes as bnb  # noqa: F401
            have_bnb = torch.cuda.is_available()
        except ImportError:
            have_bnb = False
        if kind == "adamw8bit" and not have_bnb:
            raise ConfigError("train.optimizer adamw8bit needs bitsandbytes and a CUDA GPU")
        kind = "adamw8bit" if have_bnb else "adamw"
    cls = torch.optim.AdamW
    if kind == "adamw8bit":
        import bitsandbytes as bnb
        cls = bnb.optim.AdamW8bit
    opt = cls(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    return opt, kind


def _validation_prompts(cfg: RunConfig) -> list[str]:
    d = cfg.data
    if cfg.train.validation_prompts:
        return [fill(p, token=d.token, class_noun=d.class_noun) for p in cfg.train.validation_prompts]
    return [d.prompt, f"{d.prompt} in the snow", cfg.prior.prompt_for(d.class_noun)]


def _check_identifier(tokenizer, token: str) -> None:
    pieces = tokenizer.tokenize(token)
    if len(pieces) > 1:
        log.warning("identifier %r splits into %d tokens %s; a single rare token binds the subject best",
                    token, len(pieces), pieces)
    elif pieces and tokens.check(tokenizer, token).rarity == "common":
        log.warning("identifier %r is a common word; the model must unlearn its meaning (see `boothkit token "
                    "suggest` for rare ones)", token)


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    try:
        with path.open() as fh:
            return [r for r in csv.DictReader(fh) if int(r["step"]) <= upto]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        # the log is a record, not training state: the run resumes, its log restarts at the checkpoint
        log.warning("--resume: %s is unreadable (%s); the new log starts at step %d", path, exc, upto + 1)
        return []


# ------------------------------------------------------------------------------------------- the run

def run_training(cfg: RunConfig, progress: bool = True, stop: threading.Event | None = None) -> Path:
    """Train a DreamBooth LoRA (or full fine-tune) as `cfg` says; returns the output folder.

    Setting `stop` (or Ctrl-C / SIGTERM) ends the run after the current step, checkpointed when checkpoints are
    on, by raising `Interrupted`."""
    from accelerate.state import AcceleratorState

    try:
        cfg = validate_train(cfg)
        with _output_lock(cfg):
            return _run(cfg, progress, stop)
    finally:
        # accelerate keeps its settings in a process-wide singleton; reset it so the next run in this
        # process (benchmarks, the UI, tests) may choose another precision. The process group stays.
        AcceleratorState._reset_state()


def _output_lock(cfg: RunConfig):
    """One training per output folder: a second one is refused at once. The main process holds the lock; its
    rank comes from the launcher's RANK (torchrun, accelerate launch), as accelerate's own state is made later."""
    import os

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    return folder_lock(cfg.train.output_dir, "--output-dir", "training")


@dataclass
class Trainer:
    """What the loop needs, set up once: models, optimizer, schedule and the data to draw from."""

    cfg: RunConfig
    accelerator: object
    pipe: object
    family: Family
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # component name -> (prepared) text encoder
    optimizer: object
    lr_scheduler: object
    params: list
    instance: LatentBank
    classes: LatentBank | None
    encode: PromptEncoder
    class_prompt: str
    alphas_cumprod: torch.Tensor
    prediction_type: str
    captions: list[str] | None = None  # --captions: one subject prompt per photo
    ema: object | None = None  # --ema-decay: diffusers' EMAModel of `params`
    placeholder: Placeholder | None = None  # --method ti/pivotal: the identifier as new tokens
    placeholder_ids: dict | None = None  # text encoder component -> the new tokens' ids


def _run(cfg: RunConfig, progress: bool, stop: threading.Event | None) -> Path:
    from accelerate import Accelerator

    from .precision import resolve

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision fp16 needs a GPU (use bf16 on CPU)")
    out = Path(cfg.train.output_dir)
    earlier = [p for p in (out / LORA_FILE, out / "model", ckpt.checkpoint_dir(out)) if p.exists()]
    if earlier and not (cfg.train.resume or cfg.train.overwrite):
        raise BoothkitError(f"--output-dir {out} holds an earlier run ({earlier[0].name}); pass --resume to "
                            f"continue it, --overwrite to replace it, or choose another folder")
    d = cfg.data
    photos = load_folder(d.instance_dir, skip_bad=d.skip_bad_images)
    instance_images = [img for _, img in photos]
    side = read_sidecars(photos, d)  # captions and masks: a bad one is reported before the model loads
    # auto on a CPU: what this model's own forward/backward runs fastest in (probed once, cached). The saved
    # config names the precision actually used, so a rerun elsewhere repeats it.
    precision = resolve(cfg.train.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu",
                        probe=lambda: _probe_speedup(cfg), model=model_ref(cfg.model.model))
    cfg = cfg.replace("train", mixed_precision=precision)
    pipe = load_pipeline(cfg.model.model, model_config=cfg.model.model_config, revision=cfg.model.revision,
                         vae=cfg.model.vae, dtype=_load_dtypes(cfg))
    t = cfg.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    if earlier and t.overwrite and not t.resume and accelerator.is_main_process:
        shutil.rmtree(ckpt.checkpoint_dir(out), ignore_errors=True)  # an earlier run's checkpoints must not mix in
    main = accelerator.is_main_process
    tr, resolved = _setup(cfg, accelerator, pipe, instance_images, progress and main, side, stop)
    if main:  # after set-up: a bad photo, model or class folder is reported alone, on one line
        log.info("training on %d process(es), device %s, mixed precision %s", accelerator.num_processes,
                 accelerator.device, t.mixed_precision)
    start, rows = _maybe_resume(tr, out) if t.resume else (0, [])
    if main:
        _check_room(tr, out)
        out.mkdir(parents=True, exist_ok=True)
        save_toml(out / "config.toml", resolved.to_dict())
    _loop(tr, out, start, rows, progress and main, stop)
    accelerator.wait_for_everyone()
    if main:
        if tr.ema is not None:
            tr.ema.copy_to(tr.params)  # the average is what is saved; the last raw weights are not needed again
        _save_outputs(cfg, resolved, out, tr)
    accelerator.end_training()
    return out


def _output_bytes(tr: Trainer) -> int:
    """About what the run's result takes on disk: the LoRA weights, or with --full the whole model folder."""
    modules = [m for m in tr.pipe.components.values() if isinstance(m, torch.nn.Module)] if tr.cfg.lora.full \
        else list(_models(tr).values())
    chosen = (lambda m: [*m.parameters(), *m.buffers()]) if tr.cfg.lora.full else (lambda m: _trainable(m).values())
    return sum(t.numel() * t.element_size() for m in modules for t in chosen(m)) + (1 << 20)


def _check_room(tr: Trainer, out: Path) -> None:
    """Before the first step: room for the result and, with checkpoints on, one more checkpoint (weights and
    AdamW's two moments) than the disk holds now, so an hours-long run does not fail at its end."""
    trainable = sum(p.numel() * 4 for p in tr.params)  # fp32 master weights
    t = tr.cfg.train
    states = 3 + (t.ema_decay is not None)  # weights, AdamW's two moments, the EMA
    need = _output_bytes(tr) + (states * trainable + (1 << 20) if t.checkpoint_every else 0)
    what = "the trained weights" + (" and a checkpoint" if t.checkpoint_every else "")
    check_free_space(out, need, f"--output-dir: {what}")


def _probe_speedup(cfg: RunConfig) -> float:
    """bf16 speedup of this model's training step on this CPU (a one-off load: the result is cached)."""
    from .precision import unet_step_speedup

    pipe = load_pipeline(cfg.model.model, model_config=cfg.model.model_config, revision=cfg.model.revision)
    return unet_step_speedup(pipe.unet, cfg.data.resolution or native_resolution(pipe))


def _load_dtypes(cfg: RunConfig) -> torch.dtype | dict[str, torch.dtype]:
    """LoRA: frozen weights load straight into the run's precision (the VAE in fp32: it overflows in fp16), so no
    fp32 copy of the model is ever held. A full fine-tune keeps fp32 master weights."""
    if cfg.lora.full:
        return torch.float32
    dtypes = {"default": WEIGHT_DTYPES[cfg.train.mixed_precision], "vae": torch.float32}
    if _learns_tokens(cfg):  # the identifier's embeddings train in fp32 inside the text encoders (small)
        dtypes.update(text_encoder=torch.float32, text_encoder_2=torch.float32)
    return dtypes


def _learns_tokens(cfg: RunConfig) -> bool:
    return cfg.lora.method in ("ti", "pivotal")


def _encoders_train(cfg: RunConfig) -> bool:
    """Whether gradients flow into the text encoders (their LoRA, full weights, or the identifier's rows)."""
    return cfg.lora.train_text_encoder or _learns_tokens(cfg)


def _release_frozen(tr: Trainer) -> None:
    """Free the VAE and frozen text encoders once latents and prompt embeddings are cached and nothing later
    (validation samples, uncached batches, a full model save) needs them: on a GPU their memory goes to the step."""
    cfg, pipe = tr.cfg, tr.pipe
    later = bool(cfg.train.validate_every) or cfg.lora.full
    keep_vae = later or not tr.instance.cache or (tr.classes is not None and not tr.classes.cache)
    keep_te = later or _encoders_train(cfg) or tr.encode.cached is None
    for module in ([] if keep_vae else [pipe.vae]) + ([] if keep_te else list(tr.text_encoders.values())):
        module.to("meta")  # storage freed; the module stays, so a stray later use fails loudly
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what class images and the latent cache held returns to the device


def _setup(cfg: RunConfig, accelerator, pipe, instance_images: list, progress: bool,
           side: Sidecars | None = None, stop: threading.Event | None = None) -> tuple[Trainer, RunConfig]:
    """Make class images, add LoRA, build optimizer, schedule and latent banks for the loaded model and photos."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from .generate import warn_long_prompts

    t, d, pr, lo = cfg.train, cfg.data, cfg.prior, cfg.lora
    device = accelerator.device
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    if not _learns_tokens(cfg):  # ti/pivotal make the identifier one new token, however it splits now
        _check_identifier(pipe.tokenizer, d.token)
    class_prompt = pr.prompt_for(d.class_noun)
    side = side or Sidecars()
    warn_long_prompts(pipe, {"--instance-prompt": [d.prompt], "--class-prompt": [class_prompt],
                             "--validation-prompts": _validation_prompts(cfg), "--captions": side.captions or []})
    size = d.resolution or native_resolution(pipe)
    class_dir = Path(pr.class_dir) if pr.class_dir else Path(t.output_dir) / "class_images"
    class_images = []
    if pr.prior and pr.prior_images == "subject":  # the frozen model's prediction is the target: no class images
        class_images = instance_images
    elif pr.prior:
        from .prior import ensure_class_images
        # the main process generates, the others find them made; in the run's precision (autocast)
        with accelerator.main_process_first(), accelerator.autocast():
            paths = ensure_class_images(
                pipe.to(device), class_dir, prompt=class_prompt, num_images=pr.num_class_images,
                batch_size=pr.class_batch_size, seed=pr.class_seed, steps=pr.class_steps, guidance=pr.class_guidance,
                scheduler=pr.class_scheduler, stop=stop,
                resolution=size, model_name=model_name(cfg.model.model, cfg.model.vae), progress=progress)
        class_images = [load_image(p) for p in paths]

    groups = _make_trainable(cfg, pipe, family, device, accelerator.mixed_precision)
    placeholder, placeholder_ids = None, None
    if _learns_tokens(cfg):
        placeholder, placeholder_ids, rows = _add_placeholder(cfg, pipe, family, device)
        groups.append({"params": rows, "lr": lo.ti_lr, "weight_decay": 0.0})  # decay would move every row
    optimizer, opt_kind = _make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    text_encoders = {name: getattr(pipe, name) for name in family.text_encoders}
    if _encoders_train(cfg):
        unet, *prepared, optimizer = accelerator.prepare(pipe.unet, *text_encoders.values(), optimizer)
        text_encoders = dict(zip(text_encoders, prepared))
    else:
        unet, optimizer = accelerator.prepare(pipe.unet, optimizer)

    bank = dict(size=size, vae=pipe.vae, cache=d.cache_latents, flip=d.flip, random_crop=d.crop == "random",
                device=device)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    tr = Trainer(
        cfg=cfg, accelerator=accelerator, pipe=pipe, family=family, unet=unet, text_encoders=text_encoders,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler, params=[p for grp in groups for p in grp["params"]],
        instance=LatentBank(instance_images, **bank, masks=side.masks, buckets=_buckets(cfg, pipe, size)),
        # class images stay square (made at the resolution, they have no aspect to keep): bucketing them would crop
        # them and cache them once per bucket; a non-square bucket's class half takes its own UNet pass instead
        classes=LatentBank(class_images, **bank) if pr.prior else None,
        encode=PromptEncoder(family, [getattr(pipe, n) for n in family.tokenizers], text_encoders.values(),
                             [d.prompt, class_prompt, *(side.captions or []), *([""] if d.caption_dropout else [])],
                             cache=d.cache_latents and not _encoders_train(cfg),
                             device=device, rewrite=placeholder.expand if placeholder else str),
        class_prompt=class_prompt, alphas_cumprod=noise_sched.alphas_cumprod,
        prediction_type=noise_sched.config.prediction_type, captions=side.captions, placeholder=placeholder,
        placeholder_ids=placeholder_ids)
    if t.ema_decay is not None:
        tr.ema = ema.make_ema(tr.params, t.ema_decay, t.ema_on_cpu)
    _release_frozen(tr)
    resolved = cfg.replace("data", resolution=size, instance_prompt=d.prompt) \
                  .replace("prior", class_dir=str(class_dir), class_prompt=class_prompt).replace("train", optimizer=opt_kind)
    return tr, resolved


def _buckets(cfg: RunConfig, pipe, size: int) -> list[tuple[int, int]] | None:
    """--buckets: sides in multiples of 8 latent pixels, so that the UNet's downsamplings divide them."""
    return aspect_buckets(size, int(pipe.vae_scale_factor) * 8) if cfg.data.buckets else None


def _make_trainable(cfg: RunConfig, pipe, family: Family, device, mixed_precision: str) -> list[dict]:
    """Freeze what is not trained, add LoRA adapters (or unfreeze for --full); returns optimizer param groups.
    --train-text-encoder trains every text encoder of the family (one learning rate for them)."""
    t, lo = cfg.train, cfg.lora
    unet, train_te = pipe.unet, lo.train_text_encoder
    encoders = [getattr(pipe, name) for name in family.text_encoders]
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    pipe.vae.requires_grad_(False).to(device, torch.float32).eval()  # fp32: the SD VAE overflows in fp16
    torch.manual_seed(t.seed)  # LoRA A matrices are drawn from the global RNG
    if lo.full:
        unet.requires_grad_(True)
        for te in encoders:
            te.requires_grad_(train_te)
    elif lo.method == "ti":  # the model stays as it is; only the identifier's embeddings train
        unet.requires_grad_(False).to(device, weight_dtype)
        for te in encoders:
            te.requires_grad_(False)
    else:
        unet.to(device, weight_dtype)
        add_lora(unet, lo.unet_targets, lo.rank, lo.alpha, lo.dropout, lo.adapter)
        for te in encoders:
            te.requires_grad_(False)
            if train_te:
                te.to(device, weight_dtype)
                add_lora(te, lo.text_encoder_targets, lo.rank, lo.alpha, lo.dropout, lo.adapter)
    for model in (unet, *encoders):
        model.to(device)
        for p in _trainable(model).values():
            p.data = p.data.float()  # trainable weights stay fp32; autocast handles the compute
        if not train_te and model is not unet:
            model.to(device, weight_dtype)
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in encoders if train_te else ():
            te.gradient_checkpointing_enable()
    groups = [{"params": list(_trainable(unet).values()), "lr": t.learning_rate}] if lo.method != "ti" else []
    if train_te:
        groups.append({"params": [p for te in encoders for p in _trainable(te).values()], "lr": t.text_encoder_lr})
    return groups


def _add_placeholder(cfg: RunConfig, pipe, family: Family, device) -> tuple[Placeholder, dict, list]:
    """--method ti/pivotal: the identifier as new tokens in every tokenizer, starting at the class noun's
    embedding; returns it, its ids per text encoder, and the embedding weights to train (other rows masked)."""
    placeholder = Placeholder(cfg.data.token, cfg.lora.ti_vectors)
    ids, rows = {}, []
    for component, tok in zip(family.text_encoders, family.tokenizers):
        encoder = getattr(pipe, component)
        ids[component] = add_placeholder(getattr(pipe, tok), encoder, placeholder, cfg.data.class_noun)
        rows.append(train_rows(encoder, ids[component]))
        encoder.to(device)
    return placeholder, ids, rows


def _maybe_resume(tr: Trainer, out: Path) -> tuple[int, list[dict]]:
    """Restore the newest usable checkpoint; returns (step, log rows up to it).

    A damaged checkpoint is reported by name and the one before it is tried; one made with another config is
    refused (resuming it would load the wrong shapes or silently train something else)."""
    ckpt.clean_partial(out)
    found = ckpt.list_checkpoints(out)
    if not found:
        log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt.checkpoint_dir(out))
        return 0, []
    for i, (step, path) in enumerate(reversed(found)):
        try:
            state = ckpt.load_checkpoint(path)
            if state["step"] != step:
                raise ckpt.CheckpointError(f"{path / 'state.json'}: says step {state['step']}, not {step}")
            _check_fingerprint(tr.cfg, path, state["state"])
            _apply_checkpoint(tr, path, state)
        except ckpt.CheckpointError as exc:
            later = "using the one before it" if i + 1 < len(found) else "no older checkpoint is left"
            log.warning("--resume: checkpoint %s is damaged (%s); %s", path, exc, later)
            continue
        log.info("resuming from %s (step %d)", path, step)
        return step, _read_log(out / "train_log.csv", step)
    raise BoothkitError(f"--resume: no usable checkpoint in {ckpt.checkpoint_dir(out)} (all {len(found)} are "
                        f"damaged, see the warnings); pass --overwrite to start again")


def _fingerprint(cfg: RunConfig) -> dict:
    """What a checkpoint's trainable weights depend on: a resume must match it."""
    lo = cfg.lora
    fp = {"model": model_ref(cfg.model.model), "full": lo.full, "train_text_encoder": lo.train_text_encoder}
    if not lo.full:
        fp.update(rank=lo.rank, unet_targets=list(lo.unet_targets))
        if lo.adapter != "lora":  # absent for lora, so checkpoints written before --adapter still resume
            fp["adapter"] = lo.adapter
        if lo.train_text_encoder:
            fp["text_encoder_targets"] = list(lo.text_encoder_targets)
    return fp


def _check_fingerprint(cfg: RunConfig, path: Path, state: dict) -> None:
    saved, now = state.get("config"), _fingerprint(cfg)
    if saved is None:  # written before checkpoints recorded their config: _restore compares the weights
        return
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{path / 'state.json'}: its config record is damaged")
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            where = "model.model" if key == "model" else f"lora.{key}"
            raise BoothkitError(f"--resume: checkpoint {path} does not match this config ({where}: "
                                f"{saved.get(key)!r} in the checkpoint, {now.get(key)!r} now)")


def _apply_checkpoint(tr: Trainer, path: Path, state: dict) -> None:
    """Load weights, optimizer, schedule and RNG states into the trainer."""
    _restore(tr, path, state["weights"])
    try:
        tr.optimizer.load_state_dict(state["optimizer"])
        tr.lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as exc:
        raise BoothkitError(f"--resume: checkpoint {path} does not match this config (optimizer state: {exc})") \
            from exc
    if tr.ema is not None:
        ema.load(tr.ema, state.get("states", {}).get("ema"), tr.params, tr.cfg.train.ema_on_cpu, path)
    try:
        ckpt.set_rng_states(state["rng"])
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ckpt.CheckpointError(f"{path / 'rng.pt'}: unusable RNG states ({exc})") from exc


def _loop(tr: Trainer, out: Path, start: int, rows: list[dict], progress: bool,
          stop: threading.Event | None = None) -> None:
    """Optimizer steps start..max_steps, with logging, checkpoints and validation samples."""
    cfg, acc = tr.cfg, tr.accelerator
    t, d = cfg.train, cfg.data
    trained = [tr.unet] + (list(tr.text_encoders.values()) if cfg.lora.train_text_encoder else [])
    prior_weight = cfg.prior.prior_weight if cfg.prior.prior else None
    frozen_predict = None
    if cfg.prior.prior and cfg.prior.prior_target == "frozen":
        bare = [acc.unwrap_model(m) for m in (tr.unet, *tr.text_encoders.values())]

        def frozen_predict(noisy, timesteps, prompts, time_ids):
            with adapters_disabled(*bare):
                return bare[0](noisy, timesteps, **tr.encode(prompts).unet_kwargs(time_ids)).sample
    n_micro, rank, main = t.gradient_accumulation_steps, acc.process_index, acc.is_main_process
    for m in trained:
        m.train()
    from .progress import progress_bar

    with progress_bar("train", t.max_steps, progress, completed=start, show_loss=True) as advance, \
            deferred_stop(stop) as interrupt:
        for step in range(start, t.max_steps):
            totals = torch.zeros(3)
            for micro in range(n_micro):
                k = rank * n_micro + micro  # the global micro-batch: N processes draw what N-fold accumulation does
                g = torch.Generator().manual_seed(step_seed(t.seed, step, k, 0))
                torch.manual_seed(step_seed(t.seed, step, k, 10_000))  # LoRA dropout
                with contextlib.ExitStack() as stack:
                    if micro < n_micro - 1:  # accumulate locally; all-reduce once per optimizer step
                        for m in trained:
                            stack.enter_context(acc.no_sync(m))
                    with acc.autocast():
                        batch = draw_batch(g, tr.instance, tr.captions or d.prompt, t.batch_size, tr.classes,
                                           tr.class_prompt, d.caption_dropout)
                        losses = training_step(tr.unet, tr.encode, batch, tr.alphas_cumprod, tr.prediction_type,
                                               prior_weight, g, frozen_predict, snr_gamma=t.snr_gamma,
                                               noise_offset=t.noise_offset)
                    acc.backward(losses[0] / n_micro)
                totals += torch.stack([x.detach().float().cpu() for x in losses]) / n_micro
            stop_all = None
            if acc.num_processes > 1:  # log the mean over processes, not rank 0's share; stop together on Ctrl-C
                both = acc.reduce(torch.cat([totals, torch.tensor([float(interrupt.requested)])]).to(acc.device),
                                  reduction="mean").cpu()
                totals, stop_all = both[:3], bool(both[3] > 0)
            if not torch.isfinite(totals[0]):  # before the optimizer step: the weights stay finite
                _stop_on_nonfinite(out, step + 1, float(totals[0]), t.mixed_precision)
            if t.max_grad_norm > 0:
                acc.clip_grad_norm_(tr.params, t.max_grad_norm)
            tr.optimizer.step()
            tr.lr_scheduler.step()
            tr.optimizer.zero_grad(set_to_none=True)
            if tr.ema is not None:
                ema.update(tr.ema, tr.params, t.ema_on_cpu)

            done = step + 1
            lrs = tr.lr_scheduler.get_last_lr()
            rows.append(dict(zip(LOG_FIELDS, [done, *(f"{x:.6g}" for x in totals.tolist()), f"{lrs[0]:.6g}",
                                              f"{lrs[1]:.6g}" if len(lrs) > 1 else ""])))
            advance(1, loss=float(totals[0]))
            if main:
                _after_step(tr, out, done, rows)
            if (interrupt.requested if stop_all is None else stop_all) and done < t.max_steps:
                _stop_on_interrupt(tr, out, done, rows)


def _after_step(tr: Trainer, out: Path, done: int, rows: list[dict]) -> None:
    """The main process's log, checkpoint and validation samples due after step `done`."""
    t = tr.cfg.train
    checkpoint_now = t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.max_steps
    if done % t.log_every == 0 or done == t.max_steps or checkpoint_now:  # a resume reads the log up to here
        _write_log(out / "train_log.csv", rows)
    if checkpoint_now:
        _save_checkpoint(tr, out, done)
    if t.validate_every and (done % t.validate_every == 0 or done == t.max_steps):
        with ema.swapped_in(tr.ema, tr.params):  # samples of what would be saved now
            _validate(tr, out / "validation" / f"step-{done:07d}")


def _save_checkpoint(tr: Trainer, out: Path, done: int) -> Path:
    return ckpt.save_checkpoint(out, done, _weights(tr), tr.optimizer, tr.lr_scheduler, tr.cfg.train.checkpoints_keep,
                                {"config": _fingerprint(tr.cfg)},
                                states={"ema": tr.ema.state_dict()} if tr.ema is not None else None)


def _stop_on_interrupt(tr: Trainer, out: Path, done: int, rows: list[dict]) -> None:
    """End an interrupted run after step `done`: with checkpoints on, the state at that step is saved first."""
    t, acc = tr.cfg.train, tr.accelerator
    steps = f"after step {done} of {t.max_steps}"
    if not t.checkpoint_every:
        raise Interrupted(f"interrupted {steps}; nothing to resume from (--checkpoint-every N writes checkpoints "
                          f"that --resume continues from)")
    path = ckpt.checkpoint_dir(out) / f"step-{done:07d}"
    if acc.is_main_process:
        _write_log(out / "train_log.csv", rows)
        if done % t.checkpoint_every:  # else _after_step has just written it
            path = _save_checkpoint(tr, out, done)
    acc.wait_for_everyone()
    raise Interrupted(f"interrupted {steps}: checkpoint written to {path}; run the same command with --resume "
                      f"to continue")


def _models(tr: Trainer) -> dict[str, torch.nn.Module]:
    """Component name -> unwrapped model, for every component that trains."""
    trained = {"unet": tr.unet, **(tr.text_encoders if _encoders_train(tr.cfg) else {})}
    return {name: tr.accelerator.unwrap_model(m) for name, m in trained.items()}


def _stop_on_nonfinite(out: Path, step: int, loss: float, precision: str) -> None:
    """A NaN or inf loss ends the run at once with what to try; the checkpoints already written stay."""
    found = ckpt.list_checkpoints(out)
    kept = f"the checkpoint at step {found[-1][0]} is kept (--resume continues from it)" if found else \
        "no checkpoint was written (--checkpoint-every N keeps some)"
    fp16 = "; bf16 instead of fp16" if precision == "fp16" else ""
    raise BoothkitError(f"step {step}: the loss is {loss} (not finite); try a lower --learning-rate or "
                        f"--max-grad-norm{fp16}; {kept}")


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in _models(tr).items() for k, v in _trainable(m).items()}


def _restore(tr: Trainer, path: Path, weights: dict[str, torch.Tensor]) -> None:
    models = {"unet": tr.unet, **tr.text_encoders}
    params = {f"{name}.{k}": p for name, m in models.items()
              for k, p in _trainable(tr.accelerator.unwrap_model(m)).items()}
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    wrong = [k for k in params if k in weights and weights[k].shape != params[k].shape]
    why = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
           f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, not {tuple(params[wrong[0]].shape)}" if wrong
           else "")
    if why:
        raise BoothkitError(f"--resume: checkpoint {path} does not match this config ({why})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])


@torch.no_grad()
def _validate(tr: Trainer, folder: Path) -> None:
    """Fixed-seed samples of the validation prompts with the current weights."""
    from .generate import generate_images, make_grid, save_png

    cfg, accelerator, val = tr.cfg, tr.accelerator, tr.pipe  # its unet and text encoders are the trained modules
    modes = [(m, m.training) for m in (val.unet, *(getattr(val, n) for n in tr.family.text_encoders))]
    images = []
    try:
        for m, _ in modes:
            m.eval()
        with torch.random.fork_rng(), accelerator.autocast():
            for i, prompt in enumerate(_validation_prompts(cfg)):
                imgs = generate_images(val, prompt, num_images=2, seed=0, steps=cfg.train.validation_steps,
                                       guidance=7.5)
                for j, img in enumerate(imgs):
                    save_png(img, folder / f"{i:02d}-{j}.png", f"{prompt}\nSteps: {cfg.train.validation_steps}, "
                                                                 f"CFG scale: 7.5, Seed: {j}")
                images += imgs
    finally:
        for m, was_training in modes:
            m.train(was_training)
    save_png(make_grid(images, cols=2), folder / "grid.png", "validation grid")


def _save_outputs(cfg: RunConfig, resolved: RunConfig, out: Path, tr: Trainer) -> None:
    """The trained LoRA (diffusers format, with boothkit metadata) or the full model folder."""
    d, lo, pipe = cfg.data, cfg.lora, tr.pipe
    trained = _models(tr)
    info = {"base_model": model_ref(cfg.model.model), "token": d.token, "class_noun": d.class_noun,
            "instance_prompt": d.prompt, "class_prompt": cfg.prior.prompt_for(d.class_noun),
            "prior_preservation": cfg.prior.prior, "prior_target": cfg.prior.prior_target,
            "prior_images": cfg.prior.prior_images, "rank": lo.rank, "alpha": lo.alpha,
            "unet_targets": ",".join(lo.unet_targets), "steps": cfg.train.max_steps, "resolution": resolved.data.resolution,
            "text_encoder_targets": ",".join(lo.text_encoder_targets) if lo.train_text_encoder else "",
            "family": tr.family.name, "vae": model_ref(cfg.model.vae) if cfg.model.vae else "",
            "version": __version__}
    check_free_space(out, _output_bytes(tr), f"--output-dir {out}: the trained weights")
    if lo.full:
        for name, model in trained.items():
            setattr(pipe, name, model)
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "boothkit.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")
        return
    if tr.placeholder is not None:
        vectors = {name: learned(trained[name], ids) for name, ids in tr.placeholder_ids.items()}
        save_embeddings(out, tr.family, tr.placeholder, vectors, {**info, "vectors": lo.ti_vectors, "method": lo.method})
        if lo.method == "ti":
            return
    layers = {"unet": lora_state_dict(trained["unet"])}
    adapters = {"unet": adapter_metadata(lo.unet_targets, lo.rank, lo.alpha, lo.adapter)}
    for name in tr.family.text_encoders if lo.train_text_encoder else ():
        layers[name] = canonical_text_encoder_keys(lora_state_dict(trained[name]))
        adapters[name] = adapter_metadata(lo.text_encoder_targets, lo.rank, lo.alpha, lo.adapter)
    save_lora_file(out / LORA_FILE, layers, adapters, info, kind=lo.adapter)
