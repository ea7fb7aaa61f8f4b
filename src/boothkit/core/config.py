"""Frozen, validated configs: one dataclass per stage, loaded from TOML sections and CLI flags.

A command's config is a set of sections (e.g. ``train`` = model, data, prior, lora, train). In TOML each
section is a table (``[lora] rank = 8``); on the command line every field is a flag of the same name
(``--rank 8``), so field names are unique across a command's sections. Precedence: dataclass defaults <
``--config`` file < flags given on the command line. Unknown keys and wrong types raise ConfigError naming
``section.key``; the resolved config is written back next to every output so a run can be repeated.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .files import atomic_write_bytes
from .hub_ids import SD15
from .presets import MODEL_PRESETS, model_preset, model_preset_flags  # noqa: F401  (callers' C.model_preset)

log = logging.getLogger("boothkit")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default: Any, help: str, *, choices: tuple | None = None, short: str | None = None,
        min: float | None = None, max: float | None = None, required: bool = False, text: bool = False,
        fields: tuple[str, ...] | None = None, flag: str | None = None, missing: str | None = None) -> Any:
    """A config field with the help text and limits the CLI and the validator share.

    `required`: an empty value ('' or ()) is an error naming the key and its flag.
    `text`: a value given must hold a word (an empty or all-space prompt, token or noun is a mistake).
    `fields`: the value is a template; a {name} placeholder other than these is warned about when the config is
    read (a typo would else reach the model unnoticed), and stays as written: braces are emphasis in some prompt
    dialects, so it is not refused.
    `flag`: the CLI flag when it is not --field-name (a list of tables reads better singular: --subject).
    `missing`: what the error for a missing required value adds after "is required (--flag): " (what to give).
    """
    meta = {"help": help, "choices": choices, "short": short, "min": min, "max": max, "required": required,
            "text": text, "fields": fields, "flag": flag, "missing": missing}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")  # what fill() replaces; other braces stay as written


def fill(template: str, **values: str) -> str:
    """Replace {name} placeholders of `values` only: other braces in a prompt stay as the user wrote them."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


# ----------------------------------------------------------------------------------------------- stages

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MASK_MEANS = ("image", "area")  # losses.MaskRule.mean
METHODS = ("lora", "full", "ti", "pivotal")
ADAPTERS = ("lora", "dora", "lokr", "loha")
# Sampler names `boothkit generate --scheduler` accepts (built by generate.make_scheduler).
SCHEDULERS = ("ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-a", "unipc", "pndm", "flow-euler")
# Flow-matching training (SD3/3.5, FLUX.1): diffusers' weighting_scheme names (the first three draw σ, the last
# two weigh the loss) and how σ is shifted (auto: by resolution when the scheduler shifts dynamically, as Flux's)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
FLOW_SHIFTS = ("auto", "static", "resolution")
QUANTIZE = ("int8", "nf4", "fp8")


# The one default LoRA scale of every command that draws with a LoRA (generate, sweep, the UI, the demo): 0.8, not 1.
# Measured on mini's 8 held-out subjects (docs/method.md, "Does the identifier bind?"): at 0.8 the identifier is as
# close to the subject as at 1 (LPIPS gain 0.147 against 0.136), the class prompt does not drift, and the scene
# prompts keep far more of their second object (CLIP-T 0.485 against 0.389; the base model 0.568).
LORA_SCALE = 0.8
# What --model takes, said when it is missing: there is no default, so a run never trains a toy model unasked.
MODEL_CHOICES = (f"a hub id ({SD15}), a local diffusers folder or .safetensors file, or a built-in: "
                 "mini (pretrained on emoji, to try boothkit), mini-flow (the same in FLUX.1's family), "
                 "tiny (random weights, for plumbing tests), "
                 "tiny-xl, tiny-sd3, tiny-flux (random weights in SDXL's, SD3's and FLUX.1's layouts)")
# A --model for train and class-images configs that name none (test suites and scripts set it on purpose).
DEFAULT_MODEL_ENV = "BOOTHKIT_DEFAULT_MODEL"


@dataclass(frozen=True)
class ModelConfig:
    model: str = opt("", f"Base model: a hub id (e.g. {SD15}), a local diffusers folder, a single-file "
                         ".safetensors checkpoint, or a built-in: 'mini' (pretrained on emoji), 'tiny' (random "
                         "weights).", required=True, missing=MODEL_CHOICES)
    model_config: Optional[str] = opt(None, "Local diffusers folder whose configs describe a single-file checkpoint "
                                            "(needed offline for .safetensors models).")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of --model.")
    vae: Optional[str] = opt(None, "Another VAE for --model: a diffusers AutoencoderKL folder or hub id (e.g. an "
                                   "fp16-fixed SDXL VAE); recorded in the LoRA, so generation uses it too.")
    quantize_base: Optional[str] = opt(None, "Quantize the frozen transformer and T5 of a flow-matching model (SD3, "
                                             "FLUX.1) under LoRA: int8 (torchao weight-only; CPU or GPU), nf4 "
                                             "(bitsandbytes, QLoRA; GPU), fp8 (torchao; GPU).", choices=QUANTIZE)


DEFAULT_INSTANCE_PROMPT = "a photo of {token} {class_noun}"
DEFAULT_CLASS_PROMPT = "a photo of {class_noun}"


@dataclass(frozen=True)
class Subject:
    """One subject of a several-subject run: a [[data.subjects]] table, or --subject FOLDER TOKEN CLASS."""

    instance_dir: str = opt("", "Folder with this subject's photos.", required=True)
    token: str = opt("", "Its identifier; each subject of a run needs its own.", required=True, text=True)
    class_noun: str = opt("", "Its class noun.", text=True)
    instance_prompt: Optional[str] = opt(None, "Its instance prompt; default: data.instance_prompt's template.",
                                         text=True, fields=("token", "class_noun"))
    class_prompt: Optional[str] = opt(None, "Its class prompt; default: prior.class_prompt's template.", text=True,
                                      fields=("class_noun",))
    class_dir: Optional[str] = opt(None, "Folder of its class images; default: one folder per class under "
                                         "prior.class_dir (or OUTPUT/class_images).")

    FIELDS = ("instance_dir", "token", "class_noun")  # what --subject gives, in order

    def validate(self) -> None:
        if not self.class_noun and not (self.instance_prompt and self.class_prompt):
            raise ConfigError("class_noun is required unless instance_prompt and class_prompt are given")


@dataclass(frozen=True)
class DataConfig:
    instance_dir: str = opt("", "Folder with 3-20 photos of the subject (jpg, png, webp, gif, bmp, mpo, tiff).")
    token: str = opt("sks", "Rare identifier for the subject, e.g. 'sks' or '[ktn]'.", text=True)
    class_noun: str = opt("", "Class noun of the subject, e.g. 'dog' or 'girl'.", text=True)
    instance_prompt: Optional[str] = opt(None, "Prompt for the subject photos; default 'a photo of {token} {class_noun}' "
                                               "({token} and {class_noun} are filled in).", text=True,
                                         fields=("token", "class_noun"))
    resolution: int = opt(0, "Training resolution in pixels (0: the model's native size).", min=0)
    crop: str = opt("center", "How to crop after resizing the shorter side.", choices=("center", "random"))
    flip: bool = opt(False, "Random horizontal flips.")
    skip_bad_images: bool = opt(False, "Skip unreadable images with a warning instead of stopping.")
    strict_photos: bool = opt(False, "Refuse to train when the photo audit finds anything (near-duplicates, blur, "
                                     "...: `boothkit check-photos`) instead of warning.")
    cache_latents: bool = opt(True, "Encode images with the VAE once (and prompts, when the text encoder is frozen).")
    captions: bool = opt(False, "Caption each photo from NAME.txt beside it; a caption must name the subject ({token} "
                                "or the token itself; {class_noun} is filled in). Photos without one get the "
                                "instance prompt.")
    caption_dropout: float = opt(0.0, "Chance that a subject example is trained with the empty prompt instead of its "
                                      "caption (drawn from the step's seed).", min=0.0, max=1.0)
    masked_loss: bool = opt(False, "Weigh the subject examples' loss by NAME.mask.png beside each photo (white: the "
                                   "subject, black: data.mask_outside); class examples stay unmasked.")
    mask_outside: float = opt(0.1, "--masked-loss: weight of the loss where the mask is black (0: ignored; "
                                   "OneTrainer's 'unmasked weight'; 0.1 kept most of the subject on mini, "
                                   "docs/method.md).", min=0.0, max=1.0)
    mask_mean: str = opt("image", "--masked-loss: average the weighted error over the whole picture (image: kohya's "
                                  "rule) or over the mask's weight (area: a small subject's gradient grows by one over "
                                  "its share of the picture); see docs/method.md.", choices=MASK_MEANS)
    buckets: bool = opt(False, "Aspect-ratio buckets: each photo is resized to cover the bucket (about resolution² "
                               "pixels, up to 2.5:1 either way) nearest its aspect and centre-cropped to it, not to "
                               "a square.")
    subjects: tuple[Subject, ...] = opt((), "More subjects in the same run, each with its own folder, identifier "
                                            "and class: --subject FOLDER TOKEN CLASS (repeatable), or [[data.subjects]] "
                                            "tables (instance_dir, token, class_noun; optionally instance_prompt, "
                                            "class_prompt, class_dir). --instance-dir may then be left out.",
                                        flag="--subject")

    def validate(self) -> None:
        first = self.instance_dir or not self.subjects  # --subject alone: the flat fields name no subject
        if first and not self.instance_prompt and not self.class_noun:
            raise ConfigError("data.class_noun is required (--class-noun) unless --instance-prompt is given")
        if self.buckets and self.crop == "random":  # a bucket's crop is a few pixels: nothing to randomise
            raise ConfigError("--buckets crops each photo to its bucket's centre: it cannot be used with --crop random")

    @property
    def prompt(self) -> str:
        return fill(self.instance_prompt or DEFAULT_INSTANCE_PROMPT, token=self.token, class_noun=self.class_noun)


@dataclass(frozen=True)
class PriorConfig:
    prior: bool = opt(True, "Class-specific prior-preservation loss on images of the class made by the frozen model.")
    class_prompt: Optional[str] = opt(None, "Prompt for class images; default 'a photo of {class_noun}' ({class_noun} is "
                                            "filled in).", text=True, fields=("class_noun",))
    class_dir: Optional[str] = opt(None, "Folder of class images (generated if short); default OUTPUT/class_images.")
    num_class_images: int = opt(100, "Number of class images.", min=1)
    class_batch_size: int = opt(4, "Batch size when generating class images.", min=1)
    class_steps: int = opt(20, "Sampling steps for class images.", min=1)
    class_scheduler: str = opt("auto", "Sampler for class images ('model': the model folder's own; auto: DPM++ 2M "
                                       "Karras for SD/SDXL, which at 20 steps is 1.5x faster than DDIM/PNDM at 30 "
                                       "and closer to a converged sampler (benchmarks/class_images.py); the model's "
                                       "own flow sampler for SD3/FLUX.1).",
                               choices=("auto", "model") + SCHEDULERS)
    class_guidance: Optional[float] = opt(None, "Guidance scale for class images; default: the model family's "
                                                "(7.5 SD/SDXL, 7 SD3, 3.5 FLUX.1).", min=0.0)
    class_seed: int = opt(0, "Seed of class image i is class_seed + i.")
    prior_weight: float = opt(1.0, "Weight λ of the prior-preservation loss.", min=0.0)
    prior_target: str = opt("images", "Target for the class examples: 'images' (the paper: the noise added to the "
                                      "frozen model's class images) or 'frozen' (the frozen model's own prediction "
                                      "on them, a distillation-style anchor; LoRA only).", choices=("images", "frozen"))
    prior_images: str = opt("class", "Pictures under the class examples: 'class' (class images made by the frozen "
                                     "model, the paper) or 'subject' (the subject's own pictures with the class "
                                     "prompt: no class images to make; needs --prior-target frozen).",
                            choices=("class", "subject"))

    def prompt_for(self, class_noun: str) -> str:
        return fill(self.class_prompt or DEFAULT_CLASS_PROMPT, class_noun=class_noun)


def run_subjects(data: DataConfig, prior: PriorConfig) -> list[Subject]:
    """Every subject of a run, prompts filled in: --instance-dir's (when given) first, then data.subjects. The
    first one's class folder is left to the class-folder rule (see prior.class_folders), as prior.class_dir is."""
    listed = [Subject(data.instance_dir, data.token, data.class_noun)] if data.instance_dir else []
    out = []
    for s in listed + list(data.subjects):
        instance = fill(s.instance_prompt or data.instance_prompt or DEFAULT_INSTANCE_PROMPT, token=s.token,
                        class_noun=s.class_noun)
        out.append(dataclasses.replace(s, instance_prompt=instance, class_prompt=fill(
            s.class_prompt or prior.class_prompt or DEFAULT_CLASS_PROMPT, class_noun=s.class_noun)))
    return out


@dataclass(frozen=True)
class LoraConfig:
    method: str = opt("lora", "What trains: lora (adapters), full (every weight; same as --full), ti (Textual "
                              "Inversion: only the identifier's new token embeddings, the paper's baseline), pivotal "
                              "(the identifier's embeddings and LoRA together).", choices=METHODS)
    adapter: str = opt("lora", "Adapter kind (peft) for lora/pivotal: lora, dora (LoRA with a learned per-output "
                               "magnitude), lokr (LyCORIS Kronecker product), loha (LyCORIS Hadamard product).",
                       choices=ADAPTERS)
    full: bool = opt(False, "Full fine-tune of the UNet (and text encoder) instead of LoRA (= --method full).")
    ti_vectors: int = opt(1, "ti/pivotal: embedding vectors the identifier learns (A1111's 'vectors per token').",
                          min=1, max=16)
    ti_lr: float = opt(5e-3, "ti/pivotal: learning rate of the identifier's embeddings.", min=0.0)
    rank: int = opt(8, "LoRA rank.", min=1)
    alpha: float = opt(8.0, "LoRA alpha; the update is scaled by alpha / rank.", min=0.0)
    dropout: float = opt(0.0, "LoRA dropout.", min=0.0, max=1.0)
    unet_targets: tuple[str, ...] = opt((), "Denoiser (UNet or transformer) modules that get LoRA; default: the "
                                            "model family's (SD/SDXL: to_q, to_k, to_v, to_out.0; SD3 adds the text "
                                            "stream's add_q/k/v_proj and to_add_out; FLUX.1 also the single blocks' "
                                            "proj_mlp and proj_out).")
    train_text_encoder: bool = opt(False, "Also train the text encoder (LoRA, or fully with --full).")
    text_encoder_targets: tuple[str, ...] = opt(TEXT_ENCODER_LORA_TARGETS, "Text-encoder modules that get LoRA.")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = opt("", "Output folder for weights, config, logs, checkpoints and samples.", required=True)
    max_steps: int = opt(400, "Optimizer steps.", min=1)
    batch_size: int = opt(1, "Instance images per step (as many class images are added with --prior).", min=1)
    learning_rate: float = opt(1e-4, "Learning rate of the UNet parameters.", min=0.0)
    text_encoder_lr: float = opt(5e-5, "Learning rate of the text-encoder parameters.", min=0.0)
    lr_scheduler: str = opt("constant", "Learning-rate schedule.",
                            choices=("constant", "constant_with_warmup", "linear", "cosine",
                                     "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = opt(0, "Warm-up steps of the learning-rate schedule.", min=0)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", min=0.0)
    optimizer: str = opt("auto", "auto: 8-bit AdamW when bitsandbytes and a GPU are present, else AdamW; prodigy "
                         "(finds its own step size: the learning rates are read as multipliers, the denoiser's as "
                         "1.0); adamw-schedulefree (no schedule: lr_scheduler constant, lr_warmup_steps its "
                         "warm-up); adafactor (the least optimizer memory).",
                         choices=("auto", "adamw", "adamw8bit", "prodigy", "adamw-schedulefree", "adafactor"))
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0.0, max=1.0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", min=0.0)
    weight_decay: float = opt(1e-2, "AdamW weight decay.", min=0.0)
    seed: int = opt(0, "Seed for noise, timesteps, dropout and sampling.")
    mixed_precision: str = opt("auto", "Mixed precision through accelerate; auto: bf16/fp16 on GPUs, bf16 on CPUs "
                                       "with bf16 instructions, else fp32 (no).", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    channels_last: bool = opt(False, "UNet convolutions in the channels-last memory layout (see BENCHMARKS.md for "
                                     "where it pays).")
    compile: bool = opt(False, "Compile the UNet with torch.compile (inductor): the first step waits for the compiler "
                               "(see BENCHMARKS.md for what it pays back).")
    checkpoint_every: int = opt(0, "Write a resumable checkpoint every N steps (0: never).", min=0)
    checkpoints_keep: int = opt(2, "Keep the newest K checkpoints.", min=1)
    resume: bool = opt(False, "Continue from the newest complete checkpoint in OUTPUT/checkpoints.")
    overwrite: bool = opt(False, "Allow training into an output folder that holds an earlier run's weights.")
    validate_every: int = opt(0, "Save fixed-seed validation samples every N steps (0: never).", min=0)
    validation_prompts: tuple[str, ...] = opt((), "Validation prompts ({token} and {class_noun} are filled in); "
                                                  "default: the instance prompt and two scenes.", text=True,
                                              fields=("token", "class_noun"))
    validation_steps: int = opt(20, "Sampling steps for validation samples.", min=1)
    log_every: int = opt(1, "Write train_log.csv every N steps.", min=1)
    snr_gamma: Optional[float] = opt(None, "Min-SNR-γ loss weighting (Hang et al. 2023), e.g. 5: each example's "
                                           "loss weighted by min(SNR, γ) in its prediction type's terms.")
    weighting_scheme: str = opt("logit_normal", "Flow-matching models: how σ is drawn (logit_normal, mode, "
                                                "uniform) or, drawn uniformly, how the loss is weighted (sigma_sqrt, "
                                                "cosmap), as diffusers' SD3/Flux scripts.", choices=WEIGHTING_SCHEMES)
    logit_mean: float = opt(0.0, "Flow-matching, logit_normal: mean of the normal whose sigmoid is σ's quantile.")
    logit_std: float = opt(1.0, "Flow-matching, logit_normal: its standard deviation.", min=0.0)
    mode_scale: float = opt(1.29, "Flow-matching, mode: the scale of mode sampling (SD3 paper).")
    flow_shift: str = opt("auto", "Flow-matching: shift of σ: static (the scheduler's own training sigmas: SD3's "
                                  "shift 3.0; for FLUX.1, whose scheduler shifts by resolution, none, as diffusers' "
                                  "Flux script), resolution (FLUX.1's shift by image size, as its pipeline samples), "
                                  "auto (resolution where the scheduler shifts dynamically, else static).",
                          choices=FLOW_SHIFTS)
    noise_offset: float = opt(0.0, "Offset noise, e.g. 0.05: adds this times a per-channel constant to the noise, "
                                   "so the model learns to change an image's overall brightness.", min=0.0)
    ema_decay: Optional[float] = opt(None, "Keep an EMA of the trained weights (e.g. 0.9999; the decay ramps up as "
                                           "(1+n)/(10+n) over the first steps) and save it instead of the last "
                                           "weights.")
    ema_on_cpu: bool = opt(False, "Hold the EMA weights in CPU memory between steps (saves accelerator memory).")

    def validate(self) -> None:
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"train.snr_gamma (--snr-gamma): {self.snr_gamma!r} must be above 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay (--ema-decay): {self.ema_decay!r} must be between 0 and 1")
        if self.ema_on_cpu and self.ema_decay is None:
            raise ConfigError("train.ema_on_cpu (--ema-on-cpu) needs train.ema_decay (--ema-decay)")



def check_output(path: str | os.PathLike, flag: str, *, folder: bool = True) -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder goes (or the reverse), a
    path under a file, or a place without write permission. Hours of training must not end in a failed save."""
    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; give a folder")
    if not folder and p.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    parent = p if folder and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: no permission to write in {parent}")
    return p


def validate_train(cfg: "RunConfig") -> "RunConfig":
    """Checks that span sections of a `train` config."""
    if not cfg.data.instance_dir and not cfg.data.subjects:
        raise ConfigError("data.instance_dir is required (--instance-dir, or --subject FOLDER TOKEN CLASS)")
    check_output(cfg.train.output_dir, "--output-dir")
    if cfg.prior.prior and cfg.prior.class_dir:
        check_output(cfg.prior.class_dir, "--class-dir")
    _check_subjects(cfg)
    if cfg.train.optimizer == "adamw-schedulefree" and cfg.train.lr_scheduler != "constant":
        raise ConfigError(f"train.lr_scheduler {cfg.train.lr_scheduler}: adamw-schedulefree needs no schedule "
                          f"(--lr-scheduler constant; --lr-warmup-steps is its own warm-up)")
    d, default = cfg.data, DataConfig()
    for key, flag in (("mask_outside", "--mask-outside"), ("mask_mean", "--mask-mean")):
        if not d.masked_loss and getattr(d, key) != getattr(default, key):
            raise ConfigError(f"data.{key} ({flag}) weighs the masked loss, which is off: add --masked-loss "
                              "(data.masked_loss)")
    lo = cfg.lora
    if lo.full and lo.method not in ("lora", "full"):
        raise ConfigError(f"lora.full conflicts with lora.method {lo.method} (--full is --method full)")
    if lo.adapter != "lora" and (lo.full or lo.method in ("full", "ti")):
        what = "lora.full (--full)" if lo.full else f"lora.method {lo.method} (--method)"
        raise ConfigError(f"lora.adapter {lo.adapter} (--adapter) needs adapters to train; {what} trains none "
                          "(use --method lora or pivotal)")
    if lo.full or lo.method == "full":
        if cfg.model.quantize_base:
            raise ConfigError(f"model.quantize_base (--quantize-base) {cfg.model.quantize_base}: LoRA trains on a "
                              "quantized frozen base; --method full trains every weight (drop one of them)")
        cfg = cfg.replace("lora", full=True, method="full")
    if lo.method == "ti" and lo.train_text_encoder:
        raise ConfigError("lora.method ti trains only the identifier's embeddings; --train-text-encoder needs "
                          "--method pivotal (embeddings + LoRA)")
    if lo.method == "ti" and cfg.prior.prior:
        # the class prompt never holds the new token, so its loss has no gradient to give: it would only cost time
        log.warning("--method ti: prior preservation has nothing to preserve (only the identifier's new "
                    "embedding trains); training without it")
        cfg = cfg.replace("prior", prior=False)
    if cfg.prior.prior and cfg.prior.prior_target == "frozen" and cfg.lora.full:
        raise ConfigError("prior.prior_target frozen needs LoRA: a full fine-tune keeps no frozen copy of the model "
                          "(--prior-target images)")
    if cfg.prior.prior and cfg.prior.prior_images == "subject" and cfg.prior.prior_target != "frozen":
        raise ConfigError("prior.prior_images subject needs prior.prior_target frozen: with the noise as target, "
                          "the subject's pictures would teach the class prompt to draw the subject")
    return cfg




def _check_subjects(cfg: "RunConfig") -> None:
    """Several subjects: each its own identifier and folder; methods that learn one identifier refuse them."""
    subjects = run_subjects(cfg.data, cfg.prior)
    first = 1 if cfg.data.instance_dir else 0
    where = lambda i: "data.token" if i < first else f"data.subjects[{i - first}]"  # noqa: E731
    for i, s in enumerate(subjects):
        for j in range(i):
            if subjects[j].token.lower() == s.token.lower():  # CLIP lowercases: 'SKS' is 'sks'
                raise ConfigError(f"{where(i)}: identifier {s.token!r} is already {where(j)}'s; each subject needs "
                                  f"its own")
            if Path(subjects[j].instance_dir).resolve() == Path(s.instance_dir).resolve():
                raise ConfigError(f"{where(i)}: folder {s.instance_dir} is already {where(j)}'s")
        if s.class_dir and cfg.prior.prior:
            check_output(s.class_dir, f"{where(i)}.class_dir")
    if len(subjects) > 1 and cfg.lora.method in ("ti", "pivotal"):
        raise ConfigError(f"lora.method {cfg.lora.method} learns one identifier's embeddings per run; train several "
                          f"subjects with --method lora or full, or one {cfg.lora.method} run per subject")


@dataclass(frozen=True)
class GenerateConfig:
    lora: tuple[str, ...] = opt((), "LoRA as 'PATH[:WEIGHT]': a boothkit output folder or a .safetensors file "
                                    "(boothkit, diffusers or kohya/A1111 format); the weight multiplies both scales.")
    model: Optional[str] = opt(None, "Base model; default: the one named in the first LoRA's metadata.")
    model_config: Optional[str] = opt(None, "Local diffusers folder describing a single-file checkpoint.")
    prompt: tuple[str, ...] = opt((), "Prompt (repeatable).", required=True, text=True)
    negative_prompt: str = opt("", "Negative prompt.")
    num_images: int = opt(4, "Images per prompt.", short="-n", min=1)
    guidance: Optional[float] = opt(None, "Guidance scale; default: the model family's (7.5 SD/SDXL, 7 SD3, 3.5 "
                                          "FLUX.1's distilled guidance).", min=0.0)
    unet_scale: float = opt(LORA_SCALE, "LoRA scale on the UNet (FLUX.1, SD3: the transformer); 0.8 keeps more of "
                                        "the prompt at the same likeness (docs/method.md).")
    text_encoder_scale: float = opt(LORA_SCALE, "LoRA scale on the text encoder (SDXL: on both).")
    text_encoder_2_scale: Optional[float] = opt(None, "SDXL: a separate LoRA scale for the second text encoder.")
    steps: int = opt(30, "Sampling steps.", min=1)
    scheduler: Optional[str] = opt(None, "Sampler; default: the model folder's own scheduler.", choices=SCHEDULERS)
    seed: int = opt(0, "Image i uses torch.Generator('cpu').manual_seed(seed + i).")
    width: int = opt(0, "Width in pixels, a multiple of 8 (0: the model's native size).", min=0)
    height: int = opt(0, "Height in pixels, a multiple of 8 (0: the model's native size).", min=0)
    batch_size: int = opt(1, "Images per forward pass (does not change the images).", min=1)
    vae: Optional[str] = opt(None, "Another VAE (folder or hub id); default: the one the first LoRA was trained "
                                   "with, if any.")
    mixed_precision: str = opt("auto", "Run the pipeline in this precision (fp16 needs a GPU; auto: what the "
                                       "hardware does best).", choices=MIXED_PRECISION)
    out: str = opt("", "Output folder for PNGs, grids and generate_config.toml.", required=True)

    def validate(self) -> None:
        if not self.lora and not self.model:
            raise ConfigError(f"generate: give --lora (its metadata names the base model) or --model: {MODEL_CHOICES}")


TRAIN_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "prior": PriorConfig, "lora": LoraConfig, "train": TrainConfig,
}
CLASS_IMAGES_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "prior": PriorConfig}
GENERATE_SECTIONS: dict[str, type] = {"generate": GenerateConfig}


@dataclass(frozen=True)
class RunConfig:
    """A command's resolved config: section name -> stage dataclass."""

    sections: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(cfg) for name, cfg in self.sections.items()}

    def replace(self, section: str, **changes: Any) -> "RunConfig":
        new = dict(self.sections)
        new[section] = dataclasses.replace(self.sections[section], **changes)
        return RunConfig(new)


# ---------------------------------------------------------------------------------------------- machinery

def _check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Coerce `value` to the field type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0], meta)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item_tp):
            return _check_tables(key, value, item_tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_check_value(key, v, item_tp, meta) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # TOML and click both accept nan and inf; no setting means either
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        _check_text(key, value, meta)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")
    return value


def _check_tables(key: str, value: Any, cls: type) -> tuple:
    """A list of tables (TOML [[key]]) or of positional rows (a repeated CLI flag with nargs) -> configs of `cls`."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of tables ([[{key}]]), got {value!r}")
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, (list, tuple)):  # from the CLI: the fields cls.FIELDS in order
            item = dict(zip(cls.FIELDS, item))
        if isinstance(item, cls):
            item = to_dict(item)
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table, got {item!r}")
        out.append(build(cls, item, where))
    return tuple(out)


def _check_text(key: str, value: str, meta: Mapping[str, Any]) -> None:
    """Text fields: not blank; a template's unknown {name} is reported now, not discovered in the pictures."""
    if meta.get("text") and not value.strip():
        raise ConfigError(f"{key}: empty; give some words (or leave the option out)")
    known = meta.get("fields")
    for name in [] if known is None else [m for m in PLACEHOLDER.findall(value) if m not in known]:
        log.warning("%s: {%s} in %r is not a field (%s); it stays in the prompt as written", key, name, value,
                    ", ".join("{" + f + "}" for f in known))


def check(cfg: Any, section: str) -> Any:
    """Required fields present, then the class's own checks across fields (its validate())."""
    for f in dataclasses.fields(cfg):
        if f.metadata.get("required") and getattr(cfg, f.name) in ("", (), None):
            flag = "" if "[" in section else f" (--{f.name.replace('_', '-')})"  # a table's key has no flag
            missing = f": {f.metadata['missing']}" if f.metadata.get("missing") else ""
            raise ConfigError(f"{section}.{f.name} is required{flag}{missing}")
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as exc:
            if "[" in section:  # a table of a list (data.subjects[1]): its own checks name the bare key
                raise ConfigError(f"{section}.{exc}") from None
            raise
    return cfg


def build(cls: type, values: Mapping[str, Any], section: str, validate: bool = True) -> Any:
    """Build a stage config from a mapping, validating every key and value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{section}.{key}'")
        kwargs[key] = _check_value(f"{section}.{key}", value, hints[key], fields[key].metadata)
    cfg = cls(**kwargs)
    return check(cfg, section) if validate else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain TOML-ready dict of a stage config (None values are left out: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML ({exc})") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:  # a folder, no permission, a device...
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror or type(exc).__name__})") from None


def resolve(sections: Mapping[str, type], file_values: Mapping[str, Any] | None = None,
            overrides: Mapping[str, Any] | None = None, *, where: str = "config") -> RunConfig:
    """Merge defaults < the built-in model's preset < file values (sectioned) < flat overrides (CLI flags) into a
    validated RunConfig."""
    file_values = dict(file_values or {})
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for name, table in file_values.items():
        if name not in sections:
            raise ConfigError(f"{where}: unknown section '{name}' (expected {', '.join(sections)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: '{name}' must be a table ([{name}])")
        per_section[name].update(table)
    owner = {f.name: name for name, cls in sections.items() for f in dataclasses.fields(cls)}
    for key, value in (overrides or {}).items():
        if key not in owner:
            raise ConfigError(f"unknown option '{key}'")
        per_section[owner[key]][key] = value
    if "model" in per_section:  # a built-in model's own recipe fills what neither the file nor a flag set
        if "model" not in per_section["model"] and os.environ.get(DEFAULT_MODEL_ENV):
            per_section["model"]["model"] = os.environ[DEFAULT_MODEL_ENV]
        model = per_section["model"].get("model", ModelConfig.model)
        preset = model_preset(model) if isinstance(model, str) else {}  # a wrong type is reported below
        for name in preset.keys() & per_section.keys():
            per_section[name] = {**preset[name], **per_section[name]}
    # Every key and type first, then the checks across fields: a typo is reported before a missing value.
    built = {name: build(cls, per_section[name], name, validate=False) for name, cls in sections.items()}
    for name, cfg in built.items():
        check(cfg, name)
    return RunConfig(built)


def save_toml(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write a resolved config as TOML, atomically."""
    import tomli_w

    atomic_write_bytes(path, tomli_w.dumps(dict(data)).encode())
