"""Setting up a training run: every subject's photos, the class pictures, what trains (LoRA, full weights or the
identifier's embeddings) in which precision, the optimizer, and the banks the loop draws its batches from.

`setup` returns a `Trainer`, which holds everything the loop in train.py needs; the loop itself sets nothing up.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.embeddings import Placeholder, add_placeholder, train_rows
from ..adapters.inject import add_lora
from ..core.config import RunConfig, Subject, fill, run_subjects
from ..core.errors import DataError
from ..core.files import human_bytes
from ..core.precision import DTYPES
from ..generate.generation import warn_long_prompts
from ..models import tokens
from ..models.families import Family, check_method, family_of
from ..models.memory import run_estimate
from ..models.quantize import is_quantized
from ..models.loading import model_name, native_resolution
from . import ema
from .audit import audit_photos
from .batches import LatentBank, PromptEncoder
from .data import aspect_buckets, load_folder, load_image
from .objectives import make_objective
from .optimizers import make_optimizer
from .prior import class_folders, ensure_class_images
from .sidecars import read_sidecars

log = logging.getLogger("boothkit")


@dataclass
class Trainer:
    """What the loop needs, set up once: models, optimizer, schedule and the data to draw from."""

    cfg: RunConfig
    subjects: list[Subject]  # the run's subjects, prompts filled in (config.run_subjects, resolved once)
    accelerator: object
    pipe: object
    family: Family
    denoiser: torch.nn.Module  # the UNet or transformer (prepared)
    text_encoders: dict[str, torch.nn.Module]  # every text encoder of the family, name -> (prepared when trained)
    optimizer: object
    lr_scheduler: object
    params: list
    instance: LatentBank
    classes: LatentBank | None
    encode: PromptEncoder
    objective: object  # train.objectives: what the denoiser learns to predict
    class_of: list[int] | None = None  # several subjects: subject -> its class's group in `classes`
    ema: object | None = None  # --ema-decay: diffusers' EMAModel of `params`
    placeholder: Placeholder | None = None  # --method ti/pivotal: the identifier as new tokens
    placeholder_ids: dict | None = None  # text encoder component -> the new tokens' ids
    run_record: dict | None = None  # train.fingerprint.of(self): what each checkpoint records of the config
    replaced: list = dataclasses.field(default_factory=list)  # --overwrite: the earlier run's checkpoint folders


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def validation_prompts(cfg: RunConfig) -> list[str]:
    """Each prompt template for each subject (default: its instance prompt, in the snow), then the class prompts."""
    subjects = run_subjects(cfg.data, cfg.prior)
    if cfg.train.validation_prompts:
        return list(dict.fromkeys(fill(p, token=s.token, class_noun=s.class_noun)
                                  for s in subjects for p in cfg.train.validation_prompts))
    return [p for s in subjects for p in (s.instance_prompt, f"{s.instance_prompt} in the snow")] + \
        list(dict.fromkeys(s.class_prompt for s in subjects))


def check_identifier(tokenizer, token: str) -> None:
    """Warn, as the paper advises, about an identifier of several tokens or one that is a common word."""
    c = tokens.check(tokenizer, token)
    if not c.single:
        log.warning("identifier %r splits into %d tokens %s; a single rare token binds the subject best",
                    token, len(c.pieces), [p for p, _ in c.pieces])
    elif c.rarity == "common":
        log.warning("identifier %r is a common word; the model must unlearn its meaning (see `boothkit token "
                    "suggest` for rare ones)", token)


def load_dtypes(cfg: RunConfig) -> torch.dtype | dict[str, torch.dtype]:
    """LoRA: frozen weights load straight into the run's precision (the VAE in fp32: it overflows in fp16), so no
    fp32 copy of the model is ever held. A full fine-tune keeps fp32 master weights."""
    if cfg.lora.full:
        return torch.float32
    # ti/pivotal too: only the identifier's embedding table turns fp32 (embeddings.train_rows)
    return {"default": DTYPES[cfg.train.mixed_precision], "vae": torch.float32}


def learns_tokens(cfg: RunConfig) -> bool:
    return cfg.lora.method in ("ti", "pivotal")


def encoders_train(cfg: RunConfig) -> bool:
    """Whether gradients flow into the text encoders (their LoRA, full weights, or the identifier's rows)."""
    return cfg.lora.train_text_encoder or learns_tokens(cfg)


def release_frozen(tr: Trainer) -> None:
    """Free the VAE and frozen text encoders once latents and prompt embeddings are cached and nothing later
    (validation samples, uncached batches, a full model save) needs them: on a GPU their memory goes to the step."""
    cfg, pipe = tr.cfg, tr.pipe
    later = bool(cfg.train.validate_every) or cfg.lora.full
    keep_vae = later or not tr.instance.cache or (tr.classes is not None and not tr.classes.cache)
    keep_te = later or encoders_train(cfg) or tr.encode.cached is None
    for module in ([] if keep_vae else [pipe.vae]) + ([] if keep_te else list(tr.text_encoders.values())):
        module.to("meta")  # storage freed; the module stays, so a stray later use fails loudly
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what class images and the latent cache held returns to the device


@dataclass
class Photos:
    """Every subject's photos, in subject order, with what belongs to each."""

    subjects: list[Subject]
    images: list
    prompts: list[str]  # its caption (--captions), else its subject's instance prompt
    subject: list[int]  # the index of its subject
    masks: list | None = None  # --masked-loss


def read_photos(cfg: RunConfig) -> Photos:
    d = cfg.data
    subjects = run_subjects(d, cfg.prior)
    out = Photos(subjects, [], [], [], [] if d.masked_loss else None)
    for k, s in enumerate(subjects):
        photos = load_folder(s.instance_dir, skip_bad=d.skip_bad_images)
        findings = audit_photos(s.instance_dir, photos, d.resolution)  # `boothkit check-photos` says the same
        if findings and d.strict_photos:
            raise DataError(f"--instance-dir {s.instance_dir}: {findings[0]}" + (
                f" (and {len(findings) - 1} more: boothkit check-photos {s.instance_dir})" if len(findings) > 1
                else "") + "; --strict-photos refuses it")
        for finding in findings:
            # the count load_folder has said; with --buckets no square crop cuts the picture
            if finding.kind != "count" and not (finding.kind == "crop" and d.buckets):
                log.warning("--instance-dir %s: %s", s.instance_dir, finding)
        side = read_sidecars(photos, dataclasses.replace(d, instance_dir=s.instance_dir, token=s.token,
                                                         class_noun=s.class_noun, instance_prompt=s.instance_prompt))
        out.images += [img for _, img in photos]
        out.prompts += side.captions or [s.instance_prompt] * len(photos)
        out.subject += [k] * len(photos)
        if side.masks is not None:
            out.masks += side.masks
    return out


def setup(cfg: RunConfig, accelerator, pipe, photos: Photos, progress: bool,
           stop: threading.Event | None = None) -> tuple[Trainer, RunConfig]:
    """Make class images, add LoRA, build optimizer, schedule and latent banks for the loaded model and photos."""
    from diffusers.optimization import get_scheduler

    family = family_of(pipe)
    check_method(family, cfg.lora.method, cfg.lora.adapter)
    if not cfg.lora.unet_targets:  # the family's own LoRA targets, recorded in the config as run
        cfg = cfg.replace("lora", unet_targets=family.lora_targets)
    objective = make_objective(family, pipe.scheduler, cfg.train)  # a flag the objective does not take fails here
    t, d, pr, lo = cfg.train, cfg.data, cfg.prior, cfg.lora
    device = accelerator.device
    pipe.set_progress_bar_config(disable=True)
    subjects = photos.subjects
    for s in subjects if not learns_tokens(cfg) else ():  # ti/pivotal make it one new token, however it splits
        check_identifier(pipe.tokenizer, s.token)
    captions = [p for p, k in zip(photos.prompts, photos.subject) if p != subjects[k].instance_prompt]
    warn_long_prompts(pipe, {"--instance-prompt": [s.instance_prompt for s in subjects],
                             "--class-prompt": [s.class_prompt for s in subjects],
                             "--validation-prompts": validation_prompts(cfg), "--captions": captions})
    size = d.resolution or native_resolution(pipe)
    family.check_size("--resolution", size, pipe)
    class_dirs = class_folders(subjects, pr.class_dir, t.output_dir)
    class_prompts = list(dict.fromkeys(s.class_prompt for s in subjects))  # one group of class images each
    class_of = [class_prompts.index(s.class_prompt) for s in subjects]
    classes = _class_pictures(cfg, accelerator, pipe, photos, class_prompts, class_of, class_dirs, size, progress,
                              stop) if pr.prior else None

    groups = _make_trainable(cfg, pipe, family, device, accelerator.mixed_precision)
    placeholder, placeholder_ids = None, None
    if learns_tokens(cfg):
        placeholder, placeholder_ids, rows = _add_placeholder(cfg, pipe, family, device)
        groups.append({"params": rows, "lr": lo.ti_lr, "weight_decay": 0.0})  # decay would move every row
    optimizer, opt_kind = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    text_encoders = {name: getattr(pipe, name) for name in family.text_encoders}
    trained = family.trainable_encoders if encoders_train(cfg) else ()
    denoiser, *prepared, optimizer = accelerator.prepare(getattr(pipe, family.denoiser),
                                                         *(text_encoders[n] for n in trained), optimizer)
    text_encoders.update(zip(trained, prepared))

    bank = dict(size=size, vae=pipe.vae, cache=d.cache_latents, flip=d.flip, random_crop=d.crop == "random",
                device=device, stop=stop)
    several = len(subjects) > 1
    tr = Trainer(
        cfg=cfg, subjects=subjects, accelerator=accelerator, pipe=pipe, family=family, denoiser=denoiser,
        text_encoders=text_encoders,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler, params=[p for grp in groups for p in grp["params"]],
        instance=LatentBank(photos.images, **bank, prompts=photos.prompts, masks=photos.masks,
                            buckets=_buckets(cfg, pipe, size), groups=photos.subject if several else None),
        # class images stay square (made at the resolution, they have no aspect to keep): bucketing them would crop
        # them and cache them once per bucket; a non-square bucket's class half takes its own UNet pass instead
        classes=None if classes is None else LatentBank(classes[0], **bank, prompts=classes[1],
                                                        groups=classes[2] if several else None),
        encode=PromptEncoder(family, [getattr(pipe, n) for n in family.tokenizers], text_encoders.values(),
                             list(dict.fromkeys([*photos.prompts, *class_prompts, *([""] if d.caption_dropout else [])])),
                             cache=d.cache_latents and not encoders_train(cfg),
                             device=device, rewrite=placeholder.expand if placeholder else str),
        objective=objective,
        class_of=class_of if several else None, placeholder=placeholder, placeholder_ids=placeholder_ids)
    if t.ema_decay is not None:
        tr.ema = ema.make_ema(tr.params, t.ema_decay, t.ema_on_cpu)
    release_frozen(tr)
    return tr, _resolved(cfg, subjects, class_dirs, size, opt_kind)


def _resolved(cfg: RunConfig, subjects: list[Subject], class_dirs: list[Path], size: int, opt_kind: str) -> RunConfig:
    """The config as run: prompts filled in, class folders and resolution named, so that it repeats the run."""
    first = 1 if cfg.data.instance_dir else 0
    shared = len(set(class_dirs)) == 1
    root = str(class_dirs[0]) if shared else (cfg.prior.class_dir or str(Path(cfg.train.output_dir) / "class_images"))
    more = tuple(dataclasses.replace(s, class_dir=None if shared and not s.class_dir else str(folder))
                 for s, folder in list(zip(subjects, class_dirs))[first:])
    resolved = cfg.replace("data", resolution=size, subjects=more).replace("prior", class_dir=root) \
                  .replace("train", optimizer=opt_kind)
    if first:
        resolved = resolved.replace("data", instance_prompt=subjects[0].instance_prompt) \
                           .replace("prior", class_prompt=subjects[0].class_prompt)
    return resolved


def _class_pictures(cfg: RunConfig, accelerator, pipe, photos: Photos, class_prompts: list[str], class_of: list[int],
                    class_dirs: list[Path], size: int, progress: bool, stop: threading.Event | None):
    """(pictures, prompt of each, class group of each) under the class examples: each class's images made by the
    frozen model (the paper), or with --prior-images subject the subjects' own photos with their class prompts."""
    pr = cfg.prior
    if pr.prior_images == "subject":  # the frozen model's prediction is the target: no class images
        groups = [class_of[k] for k in photos.subject]
        return photos.images, [class_prompts[grp] for grp in groups], groups

    images, prompts, groups = [], [], []
    for grp, prompt in enumerate(class_prompts):
        folder = class_dirs[class_of.index(grp)]
        # the main process generates, the others find them made; in the run's precision (autocast)
        with accelerator.main_process_first(), accelerator.autocast():
            paths = ensure_class_images(
                pipe.to(accelerator.device), folder, prompt=prompt, num_images=pr.num_class_images,
                batch_size=pr.class_batch_size, seed=pr.class_seed, steps=pr.class_steps, guidance=pr.class_guidance,
                scheduler=pr.class_scheduler, stop=stop,
                resolution=size, model_name=model_name(cfg.model.model, cfg.model.vae), progress=progress)
        images += [load_image(p) for p in paths]
        prompts += [prompt] * len(paths)
        groups += [grp] * len(paths)
    return images, prompts, groups


def _buckets(cfg: RunConfig, pipe, size: int) -> list[tuple[int, int]] | None:
    """--buckets: sides in multiples of 8 latent pixels, so that the UNet's downsamplings divide them."""
    return aspect_buckets(size, int(pipe.vae_scale_factor) * 8) if cfg.data.buckets else None


def _make_trainable(cfg: RunConfig, pipe, family: Family, device, mixed_precision: str) -> list[dict]:
    """Freeze what is not trained, add LoRA adapters (or unfreeze for --full); returns optimizer param groups.
    --train-text-encoder trains every text encoder of the family that LoRA may train (one learning rate for
    them); the others (T5) stay frozen in the run's precision."""
    t, lo = cfg.train, cfg.lora
    denoiser, train_te = getattr(pipe, family.denoiser), lo.train_text_encoder
    tuned = [getattr(pipe, name) for name in family.trainable_encoders]
    frozen = [getattr(pipe, name) for name in family.text_encoders if name not in family.trainable_encoders]
    weight_dtype = DTYPES[mixed_precision]  # the frozen weights
    pipe.vae.requires_grad_(False).to(device, torch.float32).eval()  # fp32: the SD VAE overflows in fp16
    for te in frozen:
        place(te.requires_grad_(False).eval(), device, weight_dtype)
    torch.manual_seed(t.seed)  # LoRA A matrices are drawn from the global RNG
    if lo.full:
        denoiser.requires_grad_(True)
        for te in tuned:
            te.requires_grad_(train_te)
    elif lo.method == "ti":  # the model stays as it is; only the identifier's embeddings train
        place(denoiser.requires_grad_(False), device, weight_dtype)
        for te in tuned:
            te.requires_grad_(False)
    else:
        place(denoiser, device, weight_dtype)
        add_lora(denoiser, lo.unet_targets, lo.rank, lo.alpha, lo.dropout, lo.adapter, exclude=family.lora_exclude)
        for te in tuned:
            te.requires_grad_(False)
            if train_te:
                te.to(device, weight_dtype)
                add_lora(te, lo.text_encoder_targets, lo.rank, lo.alpha, lo.dropout, lo.adapter)
    for model in (denoiser, *tuned):
        model.to(device)
        for p in trainable(model).values():
            p.data = p.data.float()  # trainable weights stay fp32; autocast handles the compute
        if not train_te and model is not denoiser:
            model.to(device, weight_dtype)
    if t.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if t.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for te in tuned if train_te else ():
            te.gradient_checkpointing_enable()
    if t.compile:
        denoiser.compile()  # in place (not torch.compile(model)): parameter and state-dict names stay as they are
    groups = [{"params": list(trainable(denoiser).values()), "lr": t.learning_rate}] if lo.method != "ti" else []
    if train_te:
        groups.append({"params": [p for te in tuned for p in trainable(te).values()], "lr": t.text_encoder_lr})
    return groups


def place(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a frozen model to the device in the run's precision. A quantized one keeps its weights' storage, and
    one with modules kept in fp32 (T5's `wo`, which overflows in fp16) keeps the dtypes it was loaded in."""
    keep = getattr(model, "_keep_in_fp32_modules", None) and dtype == torch.float16
    model.to(device) if is_quantized(model) or keep else model.to(device, dtype)


def _add_placeholder(cfg: RunConfig, pipe, family: Family, device) -> tuple[Placeholder, dict, list]:
    """--method ti/pivotal: the identifier as new tokens in every tokenizer, starting at the class noun's
    embedding; returns it, its ids per text encoder, and the embedding weights to train (other rows masked)."""
    subject = run_subjects(cfg.data, cfg.prior)[0]  # one: several subjects are refused for ti/pivotal
    placeholder = Placeholder(subject.token, cfg.lora.ti_vectors)
    ids, rows = {}, []
    for component, tok in zip(family.text_encoders, family.tokenizers):
        encoder = getattr(pipe, component)
        ids[component] = add_placeholder(getattr(pipe, tok), encoder, placeholder, subject.class_noun)
        rows.append(train_rows(encoder, ids[component]))
        encoder.to(device)
    return placeholder, ids, rows


def log_memory_estimate(tr: Trainer) -> None:
    """The training-memory estimate of a LoRA on a flow transformer (models.memory), before the first step."""
    cfg, t = tr.cfg, tr.cfg.train
    if cfg.lora.full or cfg.lora.method == "ti":
        return
    est = run_estimate(tr.pipe, tr.family, resolution=tr.instance.size, batch_size=t.batch_size, rank=cfg.lora.rank,
                       precision=t.mixed_precision, quantize=cfg.model.quantize_base,
                       gradient_checkpointing=t.gradient_checkpointing, prior=cfg.prior.prior,
                       cache=cfg.data.cache_latents)
    if est is not None:
        trained = sum(b for n, b, _ in est.rows if "LoRA" in n or "optimizer" in n)
        log.info("memory estimate: peak %s (frozen transformer %s, LoRA with gradients and optimizer %s, "
                 "activations %s; BENCHMARKS.md has the full-size tables)", human_bytes(est.peak),
                 human_bytes(est.rows[0][1]), human_bytes(trained), human_bytes(est.row("activations")))
