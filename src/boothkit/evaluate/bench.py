"""Benchmarks: the DreamBooth paper's protocol over a DreamBooth-layout dataset (the prior-preservation effect is
evaluate.prior_effect's).

`bench dreambench`: for every subject, train with one TOML train config, generate its 25 prompts (objects or live
subjects) x 4 seeded images plus class-prompt images for PRES, evaluate, and aggregate the paper's table (one row per
method, plus real photos against each other). Resumable per subject; under `accelerate launch` process i takes
subjects i, i+n, ... and the main process aggregates.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..core import config as C
from ..core.config import opt
from ..core.errors import ConfigError, DataError
from ..core.files import atomic_write_bytes, slug
from ..core.progress import progress_bar
from ..core.report import METRIC_COLUMNS, Report, plot_metric_distributions, table_csv
from .metrics import (
    METRICS,
    SAMPLES_MANIFEST,
    TINY_NOTE,
    Evaluators,
    MetricsConfig,
    evaluate_images,
    group_by_prompt,
    load_samples,
    mean_pairwise_cosine,
    print_summary,
    real_reference,
    write_samples_manifest,
)

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

PROMPTS_FILE = "prompts_and_classes.txt"
RESULTS = "results.json"
LEARNED_COLUMNS = ("DINO before", "DINO after", "CLIP-I before", "CLIP-I after")


# ------------------------------------------------------------------------------------------------ dataset

@dataclass(frozen=True)
class Dataset:
    root: Path
    classes: dict[str, str]           # subject folder -> class noun
    object_prompts: tuple[str, ...]   # templates with {0} = identifier, {1} = class noun
    live_prompts: tuple[str, ...]


_TEMPLATE = re.compile(r"^'(.*)'\.format\(\s*unique_token\s*,\s*class_token\s*\),?$")


def parse_dataset(root: str | Path) -> Dataset:
    """Read prompts_and_classes.txt of a DreamBooth-layout dataset (google/dreambooth's format)."""
    root = Path(root)
    path = root / PROMPTS_FILE
    if not path.is_file():
        raise DataError(f"--dataset {root}: no {PROMPTS_FILE} (expected the google/dreambooth dataset layout)")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        low = line.lower()
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in line and not low.startswith("subject_name"):
            name, noun = (s.strip() for s in line.split(",", 1))
            classes[name] = noun
        elif section in lists and (m := _TEMPLATE.match(line)):
            lists[section].append(m.group(1))
    if not classes or not lists["object"] or not lists["live"]:
        raise DataError(f"{path}: could not find the class list and both prompt lists")
    return Dataset(root, classes, tuple(lists["object"]), tuple(lists["live"]))


def subject_prompts(ds: Dataset, subject: str, token: str, live_classes: Sequence[str], limit: int = 0,
                    noun: Optional[str] = None) -> list[str]:
    """The subject's prompts; `noun` replaces the dataset's class noun (the class-noun ablation; "" for none)."""
    templates = ds.live_prompts if ds.classes[subject] in live_classes else ds.object_prompts
    templates = templates[:limit] if limit else templates
    noun = ds.classes[subject] if noun is None else noun
    return [" ".join(t.format(token, noun).split()) for t in templates]


CLASS_NOUN_MODES = ("correct", "none", "wrong")


def parse_wrong_nouns(pairs: Sequence[str]) -> dict[str, str]:
    """'dog=cup,cat=car' (repeatable) -> {class noun: wrong noun}."""
    out: dict[str, str] = {}
    for item in (s.strip() for p in pairs for s in p.split(",")):
        if not item:
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"--wrong-nouns: expected CLASS=NOUN, got {item!r}")
        out[key] = value
    return out


def trained_noun(b: "BenchConfig", ds: Dataset, subject: str) -> str:
    """The noun a subject is trained and prompted with under --class-nouns."""
    noun = ds.classes[subject]
    if b.class_nouns == "none":
        return ""
    if b.class_nouns == "wrong":
        wrong = parse_wrong_nouns(b.wrong_nouns)
        if noun not in wrong:
            raise ConfigError(f"--wrong-nouns: no wrong noun for class {noun!r} (subject {subject})")
        if wrong[noun] == noun:
            raise ConfigError(f"--wrong-nouns: the wrong noun for {noun!r} is the class noun itself")
        return wrong[noun]
    return noun


def select_subjects(ds: Dataset, wanted: Sequence[str]) -> list[str]:
    names = [s.strip() for w in wanted for s in w.split(",") if s.strip()]
    unknown = [s for s in names if s not in ds.classes]
    if unknown:
        raise ConfigError(f"--subjects: unknown subject {unknown[0]!r} (have {', '.join(sorted(ds.classes))})")
    return names or sorted(ds.classes)


# ------------------------------------------------------------------------------------------- samples

def generate_samples(pipe, prompts: Sequence[str], folder: Path, *, num_images: int, seed: int, steps: int,
                     guidance: float, progress: bool = True) -> list[tuple[str, Any]]:
    """Generate num_images per prompt (image i of every prompt uses seed + i), saved as PNGs + samples.json."""
    from ..generate.generation import generate_images, parameters_text, pipeline_fields, sampler_label, save_png
    from ..models.loading import native_resolution

    out, entries = [], []
    size = native_resolution(pipe)
    with progress_bar(f"sampling {folder.parent.name}/{folder.name}", len(prompts) * num_images,
                      enabled=progress) as advance:
        for p, prompt in enumerate(prompts):
            images = generate_images(pipe, prompt, num_images=num_images, seed=seed, steps=steps, guidance=guidance)
            for i, img in enumerate(images):
                name = f"{p:02d}-{slug(prompt, 40)}-s{seed + i}.png"
                params = parameters_text(prompt, "", steps=steps, sampler=sampler_label(pipe.scheduler),
                                         guidance=guidance, seed=seed + i, width=size, height=size,
                                         **pipeline_fields(pipe),
                                         loras=[(p_, w) for _, p_, w in getattr(pipe, "boothkit_loras", [])],
                                         unet_scale=1.0, text_encoder_scale=1.0)
                save_png(img, folder / name, params)
                entries.append({"file": name, "prompt": prompt, "seed": seed + i})
                out.append((prompt, img))
            advance(len(images))
    write_samples_manifest(folder, entries)  # last: a folder with a manifest is complete
    return out


def load_or_generate(pipe, prompts, folder: Path, **kw) -> list[tuple[str, Any]]:
    """The samples in `folder` if a finished run left them there (its manifest), else generated and saved now."""
    if (folder / SAMPLES_MANIFEST).is_file():
        return load_samples(folder)
    return generate_samples(pipe, prompts, folder, **kw)


# -------------------------------------------------------------------------------------------- training

# What torchrun / accelerate set for a distributed process: a per-subject training run must not see it, or
# its Accelerator would join the benchmark's process group and average gradients across different subjects.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED",
              "ACCELERATE_USE_FSDP")


def train_subject(train_values: Mapping[str, Any], overrides: Mapping[str, Any], out: Path, *,
                  separate_process: bool, local_index: int = 0, progress: bool = True) -> Path:
    """Train one subject (skipped when its result already exists); returns the run folder."""
    import torch

    from ..train.loop import final_output, train_once

    cfg = C.resolve(C.TRAIN_SECTIONS, train_values, overrides, where="--train-config")
    if not separate_process:
        return train_once(cfg, progress=progress)
    if final_output(cfg).exists():
        return out
    config_path = out.parent / "train_config.toml"
    C.save_toml(config_path, cfg.to_dict())
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("TORCHELASTIC_")}
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = str(local_index % torch.cuda.device_count())
    cmd = [sys.executable, "-c", "from boothkit.cli import main; main()", "train", "--config", str(config_path)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise DataError(f"training {out} failed (exit {proc.returncode}); see the output above")
    return out


# ------------------------------------------------------------------------------------------ dreambench

@dataclass(frozen=True)
class BenchConfig:
    dataset: str = opt("", "DreamBooth-layout dataset: subject folders and prompts_and_classes.txt.", required=True)
    train_config: Optional[str] = opt(None, "TOML train config applied to every subject (instance_dir, class_noun "
                                            "and output_dir are filled in per subject).")
    method: str = opt("", "Name of this method's row in the table (default: the train config's file name).")
    subjects: tuple[str, ...] = opt((), "Subjects to run, e.g. dog,backpack (default: all).")
    live_classes: tuple[str, ...] = opt(("dog", "cat"), "Class nouns that get the live-subject prompts.")
    prompts_limit: int = opt(0, "Use only the first N prompts of each subject (0: all 25).", min=0)
    images_per_prompt: int = opt(4, "Images per prompt (image i uses seed + i).", min=1)
    pres_images: int = opt(8, "Class-prompt images per subject for PRES.", min=1)
    sample_steps: int = opt(50, "Sampling steps.", min=1)
    guidance: Optional[float] = opt(None, "Classifier-free guidance scale; default: the model's own (7.5 SD and "
                                          "mini, 5 mini-flow, 3.5 FLUX.1's distilled guidance).", min=0.0)
    sample_seed: int = opt(0, "Seed of the first image of every prompt.")
    class_nouns: str = opt("correct", "Class-noun ablation (the paper's Table 4): train and prompt with the dataset's "
                                      "noun, no noun, or a wrong one from --wrong-nouns. PRES always uses the "
                                      "correct class.", choices=CLASS_NOUN_MODES)
    wrong_nouns: tuple[str, ...] = opt((), "For --class-nouns wrong: CLASS=NOUN pairs, e.g. backpack=can,dog=cup.")
    out: str = opt("", "Output folder; several methods can share it (one row each).", required=True)


DREAMBENCH_SECTIONS: dict[str, type] = {"bench": BenchConfig, "metrics": MetricsConfig}


def method_name(b: BenchConfig) -> str:
    if b.method:
        return b.method
    return Path(b.train_config).stem if b.train_config else "boothkit"


def run_subject(cfg: C.RunConfig, ds: Dataset, subject: str, train_values: Mapping[str, Any], ev: Evaluators,
                folder: Path, *, separate_process: bool, local_index: int) -> dict[str, Any]:
    """Train, sample and evaluate one subject; writes folder/results.json last."""
    from ..generate.generation import load_generation_pipeline
    from ..models.families import family_of
    from ..train.data import load_folder

    b = cfg.bench
    noun, trained = ds.classes[subject], trained_noun(b, ds, subject)
    overrides = {"instance_dir": str(ds.root / subject), "class_noun": trained or noun,
                 "output_dir": str(folder / "model")}
    if not trained:  # no class noun: the instance prompt is the template without it
        template = C.resolve(C.TRAIN_SECTIONS, train_values, overrides).data.instance_prompt
        overrides["instance_prompt"] = " ".join(C.fill(template or "a photo of {token} {class_noun}",
                                                       class_noun="").split())
    run = train_subject(train_values, overrides, folder / "model", separate_process=separate_process,
                        local_index=local_index)
    tcfg = C.resolve(C.TRAIN_SECTIONS, train_values, overrides)
    prompts = subject_prompts(ds, subject, tcfg.data.token, b.live_classes, b.prompts_limit, noun=trained)
    pipe = load_generation_pipeline(None, [(str(run), 1.0)])
    kw = dict(seed=b.sample_seed, steps=b.sample_steps,
              guidance=family_of(pipe).guidance_of(pipe) if b.guidance is None else b.guidance)
    samples = load_or_generate(pipe, prompts, folder / "samples", num_images=b.images_per_prompt, **kw)
    class_prompt = tcfg.prior.prompt_for(noun)  # PRES: the true class, whatever noun training used
    class_samples = load_or_generate(pipe, [class_prompt], folder / "class_samples", num_images=b.pres_images, **kw)
    before, after = instance_before_after(pipe, tcfg.data.prompt, folder, b.pres_images,
                                          learned_tokens=tcfg.lora.method in ("ti", "pivotal"), **kw)
    del pipe
    real = [img for _, img in load_folder(ds.root / subject)]
    result = evaluate_images(ev, samples, real, [img for _, img in class_samples])
    result.update(subject=subject, class_noun=noun, trained_noun=trained, method=method_name(b),
                  reference=real_reference(ev, real), evaluators=ev.describe(), class_prompt=class_prompt,
                  learned=learned_measures(ev, tcfg.data.prompt, before, after, real), train=tcfg.to_dict())
    atomic_write_bytes(folder / RESULTS, json.dumps(result, indent=2).encode())
    return result


def instance_before_after(pipe, prompt: str, folder: Path, num_images: int, learned_tokens: bool = False,
                          **kw) -> tuple[list, list]:
    """The instance prompt drawn by the base model (LoRA scales 0/0, bit for bit; a fresh base pipeline when the
    run learned the identifier's embeddings, which no scale turns off) and the trained one, same seeds."""
    from ..generate.generation import load_generation_pipeline, set_lora_scales

    base = load_generation_pipeline(pipe.boothkit_model, []) if learned_tokens else pipe
    set_lora_scales(pipe, 0.0, 0.0)
    before = load_or_generate(base, [prompt], folder / "instance_before", num_images=num_images, **kw)
    del base
    set_lora_scales(pipe, 1.0, 1.0)
    after = load_or_generate(pipe, [prompt], folder / "instance_after", num_images=num_images, **kw)
    return [img for _, img in before], [img for _, img in after]


def learned_measures(ev: Evaluators, prompt: str, before: Sequence, after: Sequence, real: Sequence) -> dict:
    """Subject fidelity of the instance prompt before and after training (the paper's simplest 'was it learned')."""
    out: dict[str, Any] = {"prompt": prompt, "n": len(after)}
    for name, tower in (("DINO", ev.dino), ("CLIP-I", ev.clip)):
        ref = tower.image_embeds(real)
        out[f"{name} before"] = mean_pairwise_cosine(tower.image_embeds(before), ref)
        out[f"{name} after"] = mean_pairwise_cosine(tower.image_embeds(after), ref)
    return out


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_dreambench(cfg: C.RunConfig) -> Optional[Path]:
    """`boothkit bench dreambench`; returns the report path on the main process."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState
    from rich.console import Console

    b = cfg.bench
    ds = parse_dataset(b.dataset)
    subjects = select_subjects(ds, b.subjects)
    train_values = C.load_toml(b.train_config) if b.train_config else {}
    try:  # a bad key fails now, not after the first subject
        tcfg = C.resolve(C.TRAIN_SECTIONS, train_values, {"instance_dir": "x", "class_noun": "x", "output_dir": "x"},
                         where=str(b.train_config))
    except ConfigError as exc:  # the model comes from the train config: bench has no --model to name
        if not str(exc).startswith("model.model is required"):
            raise
        raise ConfigError(f"--train-config {b.train_config or '(not given)'}: names no model ([model] model = ...): "
                          f"{C.MODEL_CHOICES}") from None
    if b.class_nouns == "none" and tcfg.prior.prior:
        raise ConfigError(f"--class-nouns none: {b.train_config or 'the train config'} has prior preservation on, "
                          "which needs a class noun; use a config with [prior] prior = false")
    for subject in subjects:
        trained_noun(b, ds, subject)  # a missing --wrong-nouns entry fails now too
    # subjects take long: the final barrier must not time out; without a GPU, processes talk over gloo (cpu=True)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=48))
    root = Path(b.out) / method_name(b)
    mine = subjects[state.process_index::state.num_processes]
    console = Console()
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        C.save_toml(root / "bench_config.toml", cfg.to_dict())
    todo = [s for s in mine if not (root / s / RESULTS).is_file()]
    if todo:
        ev = Evaluators(cfg.metrics)
        start = time.monotonic()
        for k, subject in enumerate(todo):
            run_subject(cfg, ds, subject, train_values, ev, root / subject,
                        separate_process=state.num_processes > 1, local_index=state.local_process_index)
            spent = time.monotonic() - start
            eta = spent / (k + 1) * (len(todo) - k - 1)
            console.log(f"process {state.process_index}: subject {k + 1}/{len(todo)} {subject} done; "
                        f"elapsed {_fmt_time(spent)}, ETA {_fmt_time(eta)}")
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_bench_report(Path(b.out), cfg)


# ------------------------------------------------------------------------------------------- aggregate

def collect_results(out: Path) -> dict[str, list[dict]]:
    """method -> results.json of each finished subject, for every method folder under `out`."""
    found: dict[str, list[dict]] = {}
    for path in sorted(out.glob(f"*/*/{RESULTS}")):
        res = json.loads(path.read_text())
        found.setdefault(res["method"], []).append(res)
    return found


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregate(results: Mapping[str, list[dict]]) -> list[dict]:
    """The paper's table: one row per method (means over its subjects), then the real-images row."""
    rows = [{"method": m, "subjects": len(rs), **{k: _mean(r["overall"][k] for r in rs) for k in METRICS}}
            for m, rs in results.items()]
    per_subject = {r["subject"]: r["reference"] for rs in results.values() for r in rs}
    rows.append({"method": "real images", "subjects": len(per_subject),
                 **{k: _mean(ref.get(k) for ref in per_subject.values()) for k in METRICS}})
    return rows


def write_bench_report(out: Path, cfg: C.RunConfig) -> Path:
    """dreambench.json / .csv / .html from every finished subject under `out`."""
    from ..train.data import load_folder

    results = collect_results(out)
    if not results:
        raise DataError(f"{out}: no finished subjects to aggregate")
    rows = aggregate(results)
    columns = ("method", "subjects") + METRIC_COLUMNS
    meaningful = all(r["evaluators"]["meaningful"] for rs in results.values() for r in rs)
    payload = {"table": rows, "subjects": results, "settings": cfg.to_dict()}
    if not meaningful:
        payload["warning"] = TINY_NOTE
    atomic_write_bytes(out / "dreambench.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "dreambench.csv", table_csv(rows, columns).encode())

    rep = Report("boothkit dreambench")
    if not meaningful:
        rep.notice(TINY_NOTE)
    rep.table(rows, columns, "Means over subjects (paper Table 1 form; PRES lower is better)")
    evs = {json.dumps(r["evaluators"], sort_keys=True) for rs in results.values() for r in rs}
    rep.text("Evaluators: " + "; ".join(sorted(evs)))
    for method, rs in results.items():
        rep.heading(f"{method}: per subject")
        rep.table([{"subject": r["subject"], **r["overall"]} for r in rs], ("subject",) + METRIC_COLUMNS)
        learned = [{"subject": r["subject"], **{k: v for k, v in r["learned"].items() if k != "prompt"}}
                   for r in rs if "learned" in r]
        if learned:
            rose = sum(x["DINO after"] > x["DINO before"] for x in learned)
            rep.table(learned, ("subject", "n") + LEARNED_COLUMNS,
                      f"{method}: the instance prompt before (base model) and after training, same seeds; "
                      f"DINO rose for {rose} of {len(learned)} subjects")
        rep.figure(plot_metric_distributions([p for r in rs for p in r["per_prompt"]]),
                   f"{method}: per-prompt values over all subjects")
        for r in rs:
            folder = out / method / r["subject"]
            noun = r.get("trained_noun", r["class_noun"])
            shown = r["class_noun"] if noun == r["class_noun"] else f"{r['class_noun']}, trained as {noun!r}"
            rep.heading(f"{method} / {r['subject']} ({shown})")
            rep.prompt_grids(group_by_prompt(load_samples(folder / "samples")),
                             [img for _, img in load_folder(Path(cfg.bench.dataset) / r["subject"])],
                             {p["prompt"]: p for p in r["per_prompt"]})
            rep.images(f"class prompt: {r['class_prompt']} (PRES {r['overall']['PRES']:.3f})",
                       [img for _, img in load_samples(folder / "class_samples")])
            if "learned" in r:
                for when in ("before", "after"):
                    rep.images(f"{r['learned']['prompt']}, {when} training (DINO {r['learned'][f'DINO {when}']:.3f})",
                               [img for _, img in load_samples(folder / f"instance_{when}")])
    rep.settings(payload["settings"])
    path = rep.write(out / "dreambench.html")
    print_summary({"evaluators": next(iter(results.values()))[0]["evaluators"]}, rows)
    return path
