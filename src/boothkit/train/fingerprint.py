"""The resume fingerprint: what a checkpoint records of its run's config, and the check that a resume matches it.

A checkpoint records every setting its weights depend on, and a resume must match each one: what trains (model,
method, adapter and its shape), on what (each subject's photos, words and prompts, the class examples), and how
(precision, resolution and framing, seed, learning rates, optimizer, batch, clipping, loss weighting, EMA). Not
recorded: where things are (the output, class and photo folders: a folder may move between a crash and its resume),
how often logs, checkpoints and samples are written, what only changes speed or memory (latent cache, gradient
checkpointing, channels-last, compile, an EMA on the CPU), and max_steps: a resume with more steps extends a run, its
learning-rate schedule stretched to the new length. Keys are recorded only where they apply (rank only for adapters,
the prior's settings only with the prior on); whether they apply is itself recorded, so a resume compares the keys
that both records hold, and a checkpoint written before a key was recorded is not compared on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from ..core.config import TRAIN_SECTIONS
from ..core.errors import BoothkitError
from ..models.loading import model_ref
from . import checkpoint as ckpt
from .data import list_images
from .sidecars import caption_path, mask_path
from .trainer import Trainer

SUBJECT_KEYS = ("subjects", "instance_prompts", "class_prompts", "photos")  # one entry per subject
START_AGAIN = "pass --overwrite instead of --resume to start again, or train into another --output-dir"


def of(tr: Trainer) -> dict:
    """What a checkpoint's weights depend on (see above), as JSON values."""
    cfg = tr.cfg
    mo, lo, d, pr, t = cfg.model, cfg.lora, cfg.data, cfg.prior, cfg.train
    adapters = not lo.full and lo.method != "ti"
    fp = {"model": model_ref(mo.model), "revision": mo.revision, "vae": model_ref(mo.vae) if mo.vae else None,
          "method": lo.method, "full": lo.full, "train_text_encoder": lo.train_text_encoder}
    if adapters:
        fp.update(adapter=lo.adapter, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                  unet_targets=list(lo.unet_targets))
        if lo.train_text_encoder:
            fp["text_encoder_targets"] = list(lo.text_encoder_targets)
    if lo.method in ("ti", "pivotal"):  # the identifier's new embeddings
        fp.update(ti_vectors=lo.ti_vectors, ti_lr=lo.ti_lr)
    subjects = tr.subjects
    fp.update(subjects=[[s.token, s.class_noun] for s in subjects],
              instance_prompts=[_words_as_fields(s.instance_prompt, s) for s in subjects],
              photos=[_photos_digest(s.instance_dir, d.captions, d.masked_loss) for s in subjects],
              resolution=tr.instance.size, crop=d.crop, flip=d.flip, buckets=d.buckets, captions=d.captions,
              caption_dropout=d.caption_dropout, masked_loss=d.masked_loss)
    if d.masked_loss:
        fp.update(mask_outside=d.mask_outside, mask_mean=d.mask_mean)
    fp["prior"] = pr.prior
    if pr.prior:
        fp.update(prior_weight=pr.prior_weight, prior_target=pr.prior_target, prior_images=pr.prior_images,
                  class_prompts=[_words_as_fields(s.class_prompt, s) for s in subjects])
        if pr.prior_images == "class":  # which class images are drawn (made ones are reused as they are)
            fp["num_class_images"] = pr.num_class_images
    fp.update(seed=t.seed, mixed_precision=t.mixed_precision, batch_size=t.batch_size,
              gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
              snr_gamma=t.snr_gamma, noise_offset=t.noise_offset,
              optimizer=type(getattr(tr.optimizer, "optimizer", tr.optimizer)).__name__.lower(),  # auto, resolved
              lr_scheduler=t.lr_scheduler)
    if t.lr_scheduler != "constant":  # diffusers' constant schedule has no warm-up
        fp["lr_warmup_steps"] = t.lr_warmup_steps
    if lo.method != "ti":  # the UNet's group (ti trains only the identifier's rows, at ti_lr without decay)
        fp.update(learning_rate=t.learning_rate, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                  adam_epsilon=t.adam_epsilon, weight_decay=t.weight_decay)
    if lo.train_text_encoder:
        fp["text_encoder_lr"] = t.text_encoder_lr
    fp.update(tr.objective.fingerprint(t))  # flow: how σ is drawn, shifted and weighed
    if mo.quantize_base:
        fp["quantize_base"] = mo.quantize_base
    fp["ema"] = "on" if t.ema_decay is not None else "off"
    if t.ema_decay is not None:
        fp["ema_decay"] = t.ema_decay
    return fp


def _words_as_fields(prompt: str, subject) -> str:
    """A filled-in prompt with the subject's identifier and class noun as {token} and {class_noun} again: a changed
    identifier is then named as that, not also as every prompt that holds it."""
    words = sorted([("{token}", subject.token), ("{class_noun}", subject.class_noun)], key=lambda w: -len(w[1]))
    for field, word in words:
        if word:
            prompt = prompt.replace(word, field)
    return prompt


def _photos_digest(folder: str, captions: bool, masks: bool) -> list:
    """[number of photos, sha256 of their names and bytes] of a subject's folder (with the captions and masks that
    the run reads beside them): the same photos in a moved folder match, a changed, added or renamed one does not."""
    photos = list_images(folder)
    files = photos + [caption_path(p) for p in photos if captions] + [mask_path(p) for p in photos if masks]
    h = hashlib.sha256()
    for p in sorted((p for p in files if p.is_file()), key=lambda p: p.name):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return [len(photos), h.hexdigest()]


def check(now: dict, path: Path, state: dict, first_is_flat: bool) -> None:
    """Refuse checkpoint `path` when its recorded config (in `state`) differs from this run's record `now`, naming
    every differing key; `first_is_flat`: the first subject is set by --instance-dir/--token/... (not a table)."""
    saved = state.get("config")
    if saved is None:  # written before checkpoints recorded their config: the loop compares the weights
        return
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{path / 'state.json'}: its config record is damaged")
    if "rank" in saved and "adapter" not in saved:  # recorded only for other adapters before every key was
        saved = {**saved, "adapter": "lora"}
    differ = _differences(saved, now, first_is_flat)
    if differ:
        raise BoothkitError(f"--resume: checkpoint {path} does not match this config ({'; '.join(differ)}); "
                            f"{START_AGAIN}")


def _differences(saved: dict, now: dict, first_is_flat: bool) -> list[str]:
    """'section.key: OLD in the checkpoint, NEW now (--flag)' for each key both records hold that differs."""
    out = []
    lists = all(isinstance(saved.get(k, []), list) for k in SUBJECT_KEYS)
    recount = lists and len(saved.get("subjects", now["subjects"])) != len(now["subjects"])
    for key in (k for k in now if k in saved and saved[k] != now[k]):
        if key not in SUBJECT_KEYS or not lists:
            out.append(_difference(*_field(key), saved[key], now[key]))
        elif recount:  # another number of subjects: named once, by their identifiers and class nouns
            out += [_difference("data.subjects", "--subject", saved[key], now[key])] if key == "subjects" else []
        else:
            out += _subject_differences(key, saved[key], now[key], first_is_flat)
    return out


def _difference(where: str, flag: str | None, old, new) -> str:
    return f"{where}: {old!r} in the checkpoint, {new!r} now" + (f" ({flag})" if flag else "")


def _field(key: str) -> tuple[str, str | None]:
    """A fingerprint key's config key and flag ('ema', EMA on or off, is train.ema_decay's)."""
    name = "ema_decay" if key == "ema" else key
    for section, cls in TRAIN_SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name == name:
                flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
                return f"{section}.{name}", f"{flag}/--no-{flag[2:]}" if isinstance(f.default, bool) else flag
    return key, None


class _Photos(list):
    """A photos digest, [count, sha256], as a message shows it."""

    def __repr__(self) -> str:
        return f"{self[0]} photos sha256:{str(self[1])[:12]}" if len(self) == 2 else list.__repr__(self)


def _subject_differences(key: str, old: list, new: list, first_is_flat: bool) -> list[str]:
    """Each subject's changed identifier, class noun, prompt or photos, named where this config sets it."""
    out = []
    for i, (a, b) in enumerate(zip(old, new)):
        if key == "subjects" and isinstance(a, list) and len(a) == 2:
            pairs = zip(("token", "class_noun"), a, b)
        elif key == "photos" and isinstance(a, list):
            pairs = [("instance_dir", _Photos(a), _Photos(b))]
        else:
            pairs = [({"instance_prompts": "instance_prompt", "class_prompts": "class_prompt"}.get(key, key), a, b)]
        out += [_difference(*_subject_field(i, name, first_is_flat), x, y) for name, x, y in pairs if x != y]
    return out


def _subject_field(i: int, name: str, first_is_flat: bool) -> tuple[str, str | None]:
    """Subject i's config key and flag: the flat --instance-dir/--token/... subject first, then data.subjects[j]."""
    if first_is_flat and i == 0:
        return _field(name)
    table = name in ("instance_dir", "token", "class_noun")  # --subject FOLDER TOKEN CLASS; prompts: TOML only
    return f"data.subjects[{i - first_is_flat}].{name}", "--subject" if table else None
