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
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..adapters.embeddings import EMBEDDINGS_FILE, learned, save_embeddings
from ..adapters.inject import adapters_disabled, lora_state_dict
from ..adapters.lora import LORA_FILE, adapter_metadata, canonical_text_encoder_keys, save_lora_file
from ..core.config import RunConfig, save_toml, validate_train
from ..core.errors import BoothkitError, ConfigError, Interrupted
from ..core.files import DiskFull, atomic_folder, atomic_write_bytes, check_free_space
from ..core.interrupts import deferred_stop
from ..core.locks import folder_lock
from ..core.precision import Timings, default_device, resolve, step_timings
from ..core.progress import progress_bar
from ..generate.generation import generate_images, make_grid, parameters_text, pipeline_fields, sampler_label, save_png
from ..models.families import Family, check_method, family_of
from ..models.loading import (architecture_digest, family_of_spec, load_pipeline, model_name, model_ref,
                              native_resolution)
from ..models.quantize import check_quantize
from . import checkpoint as ckpt
from . import ema, fingerprint
from .batches import Batch, draw_batch, step_seed
from .objectives import check_flags
from .optimizers import averaged
from .losses import MaskRule, example_mse, examples_loss, mse, prior_preservation_loss, weighted_loss
from .trainer import (
    Trainer,
    encoders_train,
    load_dtypes,
    log_memory_estimate,
    read_photos,
    setup,
    trainable,
    validation_prompts,
)

log = logging.getLogger("boothkit")
LOG_FIELDS = ("step", "loss", "instance_loss", "prior_loss", "lr", "text_encoder_lr")


# ------------------------------------------------------------------------------------------- the step

def training_step(family: Family, model, encode: Callable, batch: Batch, objective, prior_weight: float | None,
                  g: torch.Generator, frozen_predict: Callable | None = None, noise_offset: float = 0.0,
                  mask_rule: MaskRule = MaskRule()):
    """One forward pass over [subject; class] examples -> (loss, instance_loss, prior_loss).

    `family` calls the denoiser `model`; `objective` (train.objectives) draws the timesteps, noises the latents and
    says the target and each example's weight. With `frozen_predict` (--prior-target frozen) the class examples'
    target is the frozen model's own prediction for the same noisy latents and prompt, instead of the objective's.
    `noise_offset`: offset noise; `batch.masks`: the subject examples' loss masks, which count as `mask_rule` says.
    A bucketed batch's subject and class examples (`batch.latents` a pair) take one pass each.
    """
    parts = batch.latents if isinstance(batch.latents, tuple) else (batch.latents,)
    device = parts[0].device
    noises = [torch.randn(x.shape, generator=g).to(device) for x in parts]
    timesteps = objective.timesteps([(len(x), tuple(x.shape[-2:])) for x in parts], g).to(device)
    if noise_offset:  # drawn last: with 0 (no draw) the noise and timesteps are a plain run's, bit for bit
        noises = [e + noise_offset * torch.randn(e.shape[:2] + (1,) * (e.ndim - 2), generator=g).to(device)
                  for e in noises]
    time_ids = None if batch.time_ids is None else batch.time_ids.to(device)
    noisy, preds, targets, start = [], [], [], 0
    for x, e in zip(parts, noises):
        at, start = slice(start, start + len(x)), start + len(x)
        noisy.append(objective.noisy(x, e, timesteps[at]))
        preds.append(family.denoise(model, noisy[-1], timesteps[at], encode(batch.prompts[at]),
                                    None if time_ids is None else time_ids[at]))
        targets.append(objective.target(x, e, timesteps[at]))
    if prior_weight is not None and frozen_predict is not None:
        n = len(timesteps) // 2  # the class examples: the last n of the last pass
        with torch.no_grad():
            frozen = frozen_predict(noisy[-1][-n:], timesteps[n:], batch.prompts[n:],
                                    None if time_ids is None else time_ids[n:])
        targets[-1] = torch.cat([targets[-1][:-n], frozen.to(targets[-1].dtype)])
    weights = objective.weights(timesteps)
    if len(parts) == 2:  # the loss is still each half's mean over its examples, as in one pass
        per = torch.cat([example_mse(preds[0], targets[0], batch.masks, mask_rule),
                         example_mse(preds[1], targets[1])])
        return examples_loss(per, weights, prior_weight)
    pred, target = preds[0], targets[0]
    if weights is not None or batch.masks is not None:
        return weighted_loss(pred, target, weights, batch.masks, prior_weight, mask_rule)
    if prior_weight is None:
        loss = mse(pred, target)
        return loss, loss, torch.zeros_like(loss)
    return prior_preservation_loss(pred, target, prior_weight)


# ------------------------------------------------------------------------------------------------ the log

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


def final_output(cfg: RunConfig) -> Path:
    """What a finished run of `cfg` wrote last, atomically: its presence means the run is complete (the model folder
    of a full fine-tune, the embeddings of Textual Inversion, else the LoRA file)."""
    cfg, out = validate_train(cfg), Path(cfg.train.output_dir)
    return out / ("model" if cfg.lora.full else EMBEDDINGS_FILE if cfg.lora.method == "ti" else LORA_FILE)


def train_once(cfg: RunConfig, progress: bool = False) -> Path:
    """run_training, unless the output folder already holds a finished run of it (benchmarks and DreamBench reuse
    their runs and resume where a killed script stopped); returns the output folder."""
    if final_output(cfg).exists():
        return Path(cfg.train.output_dir)
    return run_training(cfg, progress=progress)


def _output_lock(cfg: RunConfig):
    """One training per output folder: a second one is refused at once. The main process holds the lock; its
    rank comes from the launcher's RANK (torchrun, accelerate launch), as accelerate's own state is made later."""
    import os

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    return folder_lock(cfg.train.output_dir, "--output-dir", "training")


def _run(cfg: RunConfig, progress: bool, stop: threading.Event | None) -> Path:
    from accelerate import Accelerator


    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision fp16 needs a GPU (use bf16 on CPU)")
    out = Path(cfg.train.output_dir)
    earlier = [p for p in (out / LORA_FILE, out / "model", ckpt.checkpoint_dir(out)) if p.exists()]
    if earlier and not (cfg.train.resume or cfg.train.overwrite):
        raise BoothkitError(f"--output-dir {out} holds an earlier run ({earlier[0].name}); pass --resume to "
                            f"continue it, --overwrite to replace it, or choose another folder")
    family = family_of_spec(cfg.model.model, cfg.model.model_config, cfg.model.revision)
    if family is not None:  # a method or loss flag the family does not take fails before anything loads
        check_method(family, cfg.lora.method, cfg.lora.adapter)
        check_flags(family, cfg.train)
        if cfg.model.quantize_base:
            check_quantize(cfg.model.quantize_base, family)
    photos = read_photos(cfg)  # photos, captions and masks: a bad one is reported before the model loads
    # auto on a CPU: what this model's own forward/backward runs fastest in (probed once, cached). The saved
    # config names the precision actually used, so a rerun elsewhere repeats it.
    digest = architecture_digest(cfg.model.model, family.denoiser, cfg.model.revision) if family else ""
    precision = resolve(cfg.train.mixed_precision, default_device(), probe=lambda: _probe_timings(cfg),
                        model=f"{model_ref(cfg.model.model)} {digest}".strip())
    cfg = cfg.replace("train", mixed_precision=precision)
    pipe = load_pipeline(cfg.model.model, model_config=cfg.model.model_config, revision=cfg.model.revision,
                         vae=cfg.model.vae, dtype=load_dtypes(cfg), quantize=cfg.model.quantize_base)
    t = cfg.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    main = accelerator.is_main_process
    tr, resolved = setup(cfg, accelerator, pipe, photos, progress and main, stop)
    if earlier and t.overwrite and not t.resume and main:
        # --overwrite: the earlier run's checkpoints go once this run has one of its own (or its weights), so a
        # refusal or a crash before that point destroys nothing; they never mix into this run's pruning or resume
        tr.replaced = [p for _, p in ckpt.list_checkpoints(out)]
    tr.run_record = fingerprint.of(tr)  # once: it hashes the photos, and each checkpoint records it
    if main:  # after set-up: a bad photo, model or class folder is reported alone, on one line
        log.info("training on %d process(es), device %s, mixed precision %s", accelerator.num_processes,
                 accelerator.device, t.mixed_precision)
        log_memory_estimate(tr)
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
        try:
            with averaged(tr.optimizer):  # schedule-free: the average it converged in, not its training point
                _save_outputs(cfg, resolved, out, tr)
        except DiskFull as exc:  # the run's own way on: resume from its newest checkpoint, not start again
            kept = ("its checkpoints are kept: free some space and run the same command with --resume"
                    if ckpt.list_checkpoints(out) else "free some space and run the command again")
            raise DiskFull(exc.path, exc.reason, kept) from exc
        _drop_replaced(tr)
    accelerator.end_training()
    return out


def _output_bytes(tr: Trainer) -> int:
    """About what the run's result takes on disk: the LoRA weights, or with --full the whole model folder."""
    modules = [m for m in tr.pipe.components.values() if isinstance(m, torch.nn.Module)] if tr.cfg.lora.full \
        else list(_models(tr).values())
    chosen = (lambda m: [*m.parameters(), *m.buffers()]) if tr.cfg.lora.full else (lambda m: trainable(m).values())
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


def _probe_timings(cfg: RunConfig) -> Timings:
    """This model's training step in fp32 and in bf16 on this CPU (a one-off load: the result is cached)."""
    pipe = load_pipeline(cfg.model.model, model_config=cfg.model.model_config, revision=cfg.model.revision)
    family = family_of(pipe)
    model = getattr(pipe, family.denoiser)
    return step_timings(model, family.probe_forward(model, cfg.data.resolution or native_resolution(pipe)))


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
            fingerprint.check(tr.run_record, path, state["state"], first_is_flat=bool(tr.cfg.data.instance_dir))
            _apply_checkpoint(tr, path, state)
        except ckpt.CheckpointError as exc:
            later = "using the one before it" if i + 1 < len(found) else "no older checkpoint is left"
            log.warning("--resume: checkpoint %s is damaged (%s); %s", path, exc, later)
            continue
        log.info("resuming from %s (step %d)", path, step)
        return step, _read_log(out / "train_log.csv", step)
    raise BoothkitError(f"--resume: no usable checkpoint in {ckpt.checkpoint_dir(out)} (all {len(found)} are "
                        f"damaged, see the warnings); pass --overwrite to start again")


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
    trained = [tr.denoiser] + ([tr.text_encoders[n] for n in tr.family.trainable_encoders]
                               if cfg.lora.train_text_encoder else [])
    prior_weight = cfg.prior.prior_weight if cfg.prior.prior else None
    mask_rule = MaskRule(d.mask_outside, d.mask_mean)
    frozen_predict = None
    if cfg.prior.prior and cfg.prior.prior_target == "frozen":
        bare = [acc.unwrap_model(m) for m in (tr.denoiser, *tr.text_encoders.values())]

        def frozen_predict(noisy, timesteps, prompts, time_ids):
            with adapters_disabled(*bare):
                return tr.family.denoise(bare[0], noisy, timesteps, tr.encode(prompts), time_ids)
    n_micro, rank, main = t.gradient_accumulation_steps, acc.process_index, acc.is_main_process
    for m in trained:
        m.train()

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
                        batch = draw_batch(g, tr.instance, t.batch_size, tr.classes, d.caption_dropout, tr.class_of)
                        losses = training_step(tr.family, tr.denoiser, tr.encode, batch, tr.objective,
                                               prior_weight, g, frozen_predict,
                                               noise_offset=t.noise_offset, mask_rule=mask_rule)
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
            with averaged(tr.optimizer):
                _validate(tr, out / "validation" / f"step-{done:07d}", done)


def _save_checkpoint(tr: Trainer, out: Path, done: int) -> Path:
    path = ckpt.save_checkpoint(out, done, _weights(tr), tr.optimizer, tr.lr_scheduler,
                                tr.cfg.train.checkpoints_keep + len(tr.replaced), {"config": tr.run_record},
                                states={"ema": tr.ema.state_dict()} if tr.ema is not None else None)
    _drop_replaced(tr, keep=path)
    return path


def _drop_replaced(tr: Trainer, keep: Path | None = None) -> None:
    """Remove the checkpoints of the run --overwrite replaces (all but `keep`, the one just written over one of
    them), then prune this run's own to checkpoints_keep."""
    if not tr.replaced:
        return
    for old in tr.replaced:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    tr.replaced = []
    out = Path(tr.cfg.train.output_dir)
    for _, old in ckpt.list_checkpoints(out)[:-tr.cfg.train.checkpoints_keep]:
        shutil.rmtree(old, ignore_errors=True)


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
    trained = {tr.family.denoiser: tr.denoiser,
               **({n: tr.text_encoders[n] for n in tr.family.trainable_encoders} if encoders_train(tr.cfg) else {})}
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
    return {f"{name}.{k}": v for name, m in _models(tr).items() for k, v in trainable(m).items()}


def _restore(tr: Trainer, path: Path, weights: dict[str, torch.Tensor]) -> None:
    models = {tr.family.denoiser: tr.denoiser, **tr.text_encoders}
    params = {f"{name}.{k}": p for name, m in models.items()
              for k, p in trainable(tr.accelerator.unwrap_model(m)).items()}
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
def _validate(tr: Trainer, folder: Path, step: int) -> None:
    """Fixed-seed samples of the validation prompts with the current weights, each PNG with its full parameters."""
    cfg, accelerator, val = tr.cfg, tr.accelerator, tr.pipe  # its unet and text encoders are the trained modules
    parts = (tr.family.denoiser,) + tr.family.text_encoders
    modes = [(m, m.training) for m in (getattr(val, n) for n in parts)]
    guidance, prompts, seeds = tr.family.guidance_of(tr.pipe), validation_prompts(cfg), (0, 1)
    images = []
    try:
        for m, _ in modes:
            m.eval()
        with torch.random.fork_rng(), accelerator.autocast():
            for i, prompt in enumerate(prompts):
                imgs = generate_images(val, prompt, num_images=len(seeds), seed=seeds[0],
                                       steps=cfg.train.validation_steps, guidance=guidance)
                for j, img in enumerate(imgs):
                    save_png(img, folder / f"{i:02d}-{j}.png", _validation_parameters(tr, prompt, seeds[j], img, step, guidance))
                images += imgs
    finally:
        for m, was_training in modes:
            m.train(was_training)
    # one row per prompt, one column per seed
    save_png(make_grid(images, cols=len(seeds)), folder / "grid.png",
             _validation_parameters(tr, "\n".join(prompts), seeds, images[0], step, guidance))


def _validation_parameters(tr: Trainer, prompt: str, seed, image, step: int, guidance: float) -> str:
    """A validation picture's parameters: the base model, and the run's weights at `step` in place of a LoRA file
    (the text encoders' and denoiser's own precision, under training's autocast where it is on)."""
    fields = pipeline_fields(tr.pipe)
    if tr.cfg.train.mixed_precision != "no":
        fields["precision"] += f" (autocast {tr.cfg.train.mixed_precision})"
    fields["model"] = model_name(tr.cfg.model.model, tr.cfg.model.vae)
    return parameters_text(prompt, "", steps=tr.cfg.train.validation_steps, sampler=sampler_label(tr.pipe.scheduler),
                           guidance=guidance, seed=seed, width=image.width,
                           height=image.height, loras=[], **fields,
                           extra={"Weights": f"{tr.cfg.train.output_dir} at step {step} (validation)"})


def _save_outputs(cfg: RunConfig, resolved: RunConfig, out: Path, tr: Trainer) -> None:
    """The trained LoRA (diffusers format, with boothkit metadata) or the full model folder."""
    lo, pipe = tr.cfg.lora, tr.pipe  # as run: the LoRA targets filled in from the family
    trained = _models(tr)
    subjects = tr.subjects
    first = subjects[0]
    info = {"base_model": model_ref(cfg.model.model), "token": first.token, "class_noun": first.class_noun,
            "instance_prompt": first.instance_prompt, "class_prompt": first.class_prompt,
            "prior_preservation": cfg.prior.prior, "prior_target": cfg.prior.prior_target,
            "prior_images": cfg.prior.prior_images, "rank": lo.rank, "alpha": lo.alpha,
            "unet_targets": ",".join(lo.unet_targets), "steps": cfg.train.max_steps, "resolution": resolved.data.resolution,
            "text_encoder_targets": ",".join(lo.text_encoder_targets) if lo.train_text_encoder else "",
            "family": tr.family.name, "vae": model_ref(cfg.model.vae) if cfg.model.vae else "",
            "version": __version__}
    if len(subjects) > 1:  # every identifier the weights answer to
        info["subjects"] = json.dumps([{"token": s.token, "class_noun": s.class_noun,
                                        "instance_prompt": s.instance_prompt} for s in subjects])
    check_free_space(out, _output_bytes(tr), f"--output-dir {out}: the trained weights")
    if lo.full:
        for name, model in trained.items():
            setattr(pipe, name, model)
        # the old model stays readable until the new one is complete on disk, then they swap in one step
        with atomic_folder(out / "model") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "boothkit.json").write_text(json.dumps(info, indent=2))
        return
    if tr.placeholder is not None:
        vectors = {name: learned(trained[name], ids) for name, ids in tr.placeholder_ids.items()}
        save_embeddings(out, tr.family, tr.placeholder, vectors, {**info, "vectors": lo.ti_vectors, "method": lo.method})
        if lo.method == "ti":
            return
    denoiser = tr.family.denoiser
    layers = {denoiser: lora_state_dict(trained[denoiser])}
    adapters = {denoiser: adapter_metadata(lo.unet_targets, lo.rank, lo.alpha, lo.adapter, tr.family.lora_exclude)}
    for name in tr.family.trainable_encoders if lo.train_text_encoder else ():
        layers[name] = canonical_text_encoder_keys(lora_state_dict(trained[name]))
        adapters[name] = adapter_metadata(lo.text_encoder_targets, lo.rank, lo.alpha, lo.adapter)
    save_lora_file(out / LORA_FILE, layers, adapters, info, kind=lo.adapter)
