"""Two training extras measured on the built-in `mini` model: min-SNR-γ on convergence speed, masked loss on
background leakage. The numbers in docs/method.md ("Training extras", "Measured on mini") come from this script.

1. min-SNR-γ (`--snr-gamma`): the DreamBooth recipe (examples/mini-dreambooth.toml: LoRA on UNet + text encoder,
   prior preservation, lr 1e-3 / 2e-4, fp32) with the weighting off and at γ, on held-out Fluent UI subjects
   (src/boothkit/assets/emoji_subjects), measured after several step counts with `boothkit bench dreambench`'s
   protocol and evaluators (the subject's 12 prompts x N seeded images, DDIM, mini's DINO / CLIP). Each variant
   trains once to the largest step count with a checkpoint every gcd(steps) steps; the LoRA at a smaller count N
   is written by `--resume` from the step-N checkpoint with max_steps N. Every random draw of step s depends only
   on (seed, s) and the learning rate is constant, so that LoRA is bit for bit the one a separate N-step run
   writes.
2. masked loss (`--masked-loss`): a variant of some subjects whose 5 photos all share one plain background
   (`--mask-background`, one of boothkit.mini.scenes.BACKGROUNDS, named in mini's captions), composed from the Fluent UI
   emoji like boothkit.mini.subjects.build_dataset, with NAME.mask.png from the emoji's alpha (white: the subject).
   Each subject trains with and without the mask (the same recipe otherwise); prompts that do not name that
   background are drawn with fixed seeds and leakage is the share of the picture's border ring (outer
   `--ring` px) within `--tolerance` and `--loose-tolerance` (RGB distance) of the training background colour,
   and the ring's median distance to it, beside the base model's (the reference) and subject fidelity (DINO / CLIP-I to the subject's shipped photos, which have varied
   backgrounds).

Usage (needs resvg-py for the Fluent UI emoji: pip install 'boothkit[data]'; the npm pack is fetched once):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/extras_mini.py --out extras-mini --csv docs/extras-mini.csv
Finished evaluations are kept under --out (JSON per evaluation), so a rerun only does what is missing.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="extras-mini", help="work folder (runs, class images, samples, evaluations)")
    ap.add_argument("--csv", default=str(REPO / "docs" / "extras-mini.csv"), help="CSV of every measured row")
    ap.add_argument("--part", choices=("both", "snr", "mask"), default="both")
    ap.add_argument("--train-config", default=str(REPO / "examples" / "mini-dreambooth.toml"))
    ap.add_argument("--dataset", default=None, help="DreamBooth-layout dataset (default: mini's emoji subjects)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the first image of every prompt")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8, help="images per sampling batch (image i keeps seed + i)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    # min-SNR
    ap.add_argument("--snr-subjects", default="girl,boy,backpack,car,cup")
    ap.add_argument("--snr-steps", default="50,100,200,400,800")
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--images-per-prompt", type=int, default=4, help="bench dreambench's default")
    ap.add_argument("--instance-images", type=int, default=8, help="images of the instance prompt alone")
    # masked loss
    ap.add_argument("--mask-subjects", default="girl,boy,backpack,car")
    ap.add_argument("--mask-background", default="dark blue")
    ap.add_argument("--mask-steps", type=int, default=400)
    ap.add_argument("--mask-rules", default="area:0,image:0,image:0.1",
                    help="masked runs as MEAN:OUTSIDE (--mask-mean, --mask-outside), comma-separated")
    ap.add_argument("--leak-prompts", default="an emoji of {token} {noun}|an emoji of {token} {noun} on a white "
                                              "background|an emoji of {token} {noun} on a pink background",
                    help="'|'-separated prompts that do not name the training background")
    ap.add_argument("--leak-images", type=int, default=8, help="images per leakage prompt")
    ap.add_argument("--ring", type=int, default=8, help="border ring width in pixels (of 64)")
    ap.add_argument("--tolerance", type=float, default=30.0, help="RGB distance counted as the background colour")
    ap.add_argument("--loose-tolerance", type=float, default=90.0,
                    help="a looser distance, for backgrounds drawn near but not at the colour")
    return ap.parse_args(argv)


def csv_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


class Ctx:
    """What both experiments share: config, dataset, evaluators, the base pipeline, timings."""

    def __init__(self, a: argparse.Namespace):
        from boothkit.core import config as C
        from boothkit.evaluate.bench import parse_dataset
        from boothkit.evaluate.metrics import Evaluators, MetricsConfig
        from boothkit.mini.subjects import dataset_dir

        self.a, self.out = a, Path(a.out)
        self.train_values = C.load_toml(a.train_config)
        self.ds = parse_dataset(a.dataset or dataset_dir())
        mcfg = C.resolve({"metrics": MetricsConfig}, {},
                         {"clip_model": "mini", "dino_model": "mini", "lpips_size": 64, "device": "cpu"}).metrics
        self.ev = Evaluators(mcfg)
        probe = C.resolve(C.TRAIN_SECTIONS, self.train_values,
                          {"instance_dir": "x", "class_noun": "x", "output_dir": "x"})
        self.token, self.model = probe.data.token, probe.model.model
        self.instance_template = probe.data.instance_prompt
        self._base = None
        self.timings: dict[str, float] = {}

    def base_pipe(self):
        from boothkit.generate.generation import load_generation_pipeline

        if self._base is None:
            self._base = load_generation_pipeline(self.model, [])
        return self._base

    def overrides(self, subject: str, instance_dir: Path, output_dir: Path, **more) -> dict:
        return {"instance_dir": str(instance_dir), "class_noun": self.ds.classes[subject],
                "class_dir": str(self.out / "class_images" / subject), "output_dir": str(output_dir),
                "seed": self.a.seed, "mixed_precision": "no", **more}

    def instance_prompt(self, subject: str) -> str:
        from boothkit.core import config as C

        return " ".join(C.fill(self.instance_template, token=self.token, class_noun=self.ds.classes[subject]).split())

    def real(self, subject: str, folder: Path | None = None) -> list:
        from boothkit.train.data import load_folder

        return [img for _, img in load_folder(folder or self.ds.root / subject)]

    def generate(self, pipe, prompt: str, n: int) -> list:
        from boothkit.generate.generation import generate_images

        a = self.a
        return generate_images(pipe, prompt, num_images=n, seed=a.sample_seed, steps=a.sample_steps,
                               guidance=a.guidance, batch_size=a.batch)

    def fidelity(self, images, real) -> dict:
        from boothkit.evaluate.metrics import mean_pairwise_cosine

        return {"DINO": mean_pairwise_cosine(self.ev.dino.image_embeds(images), self.ev.dino.image_embeds(real)),
                "CLIP-I": mean_pairwise_cosine(self.ev.clip.image_embeds(images), self.ev.clip.image_embeds(real))}

    def timed(self, key: str, start: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start


def cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


# ---------------------------------------------------------------------------------------------- min-SNR-γ

def train_to(ctx: Ctx, subject: str, root: Path, steps: list[int], gamma: float | None) -> dict[int, Path]:
    """Run folders with the LoRA after each step count: one run to the largest, the others from its checkpoints."""
    from boothkit.evaluate.bench import train_subject
    from boothkit.train.checkpoint import list_checkpoints
    from boothkit.adapters.lora import LORA_FILE

    top, every = steps[-1], math.gcd(*steps)
    extra = {} if gamma is None else {"snr_gamma": gamma}
    full = root / f"steps-{top}"
    t0 = time.perf_counter()
    if not (full / LORA_FILE).is_file():
        ov = ctx.overrides(subject, ctx.ds.root / subject, full, max_steps=top, **extra,
                           checkpoint_every=every if every < top else 0, checkpoints_keep=max(1, top // every))
        train_subject(ctx.train_values, ov, full, separate_process=False, progress=False)
    runs = {top: full}
    for n in steps[:-1]:
        dest = root / f"steps-{n}"
        if not (dest / LORA_FILE).is_file():
            ckpt = dict(list_checkpoints(full))[n]
            shutil.rmtree(dest, ignore_errors=True)
            (dest / "checkpoints").mkdir(parents=True)
            shutil.copytree(ckpt, dest / "checkpoints" / ckpt.name)
            shutil.copy(full / "train_log.csv", dest / "train_log.csv")
            ov = ctx.overrides(subject, ctx.ds.root / subject, dest, max_steps=n, resume=True, **extra)
            train_subject(ctx.train_values, ov, dest, separate_process=False, progress=False)
        runs[n] = dest
    ctx.timed("snr: training", t0)
    return runs


def bench_eval(ctx: Ctx, pipe, subject: str) -> dict:
    """bench dreambench's measures of one model on one subject: its prompts, then the instance prompt alone."""
    from boothkit.evaluate.bench import subject_prompts
    from boothkit.evaluate.metrics import evaluate_images
    from boothkit.mini.subjects import LIVE_CLASSES

    t0 = time.perf_counter()
    a, real = ctx.a, ctx.real(subject)
    prompts = subject_prompts(ctx.ds, subject, ctx.token, LIVE_CLASSES)
    samples = [(p, img) for p in prompts for img in ctx.generate(pipe, p, a.images_per_prompt)]
    instance = ctx.generate(pipe, ctx.instance_prompt(subject), a.instance_images)
    ctx.timed("snr: sampling", t0)
    t0 = time.perf_counter()
    res = evaluate_images(ctx.ev, samples, real)
    inst = ctx.fidelity(instance, real)
    ctx.timed("snr: evaluation", t0)
    return {**{k: res["overall"][k] for k in ("DINO", "CLIP-I", "CLIP-T", "DIV")},
            "instance DINO": inst["DINO"], "instance CLIP-I": inst["CLIP-I"], "n_images": res["num_images"]}


def run_snr(ctx: Ctx) -> list[dict]:
    from boothkit.generate.generation import load_generation_pipeline

    a = ctx.a
    steps = sorted({int(s) for s in csv_list(a.snr_steps)})
    variants = (("off", None), (f"γ={a.snr_gamma:g}", a.snr_gamma))
    rows = []
    for subject in csv_list(a.snr_subjects):
        ev_dir = ctx.out / "snr" / "evals" / subject
        base = cached(ev_dir / "base.json", lambda s=subject: bench_eval(ctx, ctx.base_pipe(), s))
        rows.append({"experiment": "min-snr", "variant": "base model", "steps": 0, "subject": subject, **base})
        for label, gamma in variants:
            runs = None
            for n in steps:
                path = ev_dir / f"{label.replace('=', '')}-{n}.json"
                if not path.is_file():
                    runs = runs or train_to(ctx, subject, ctx.out / "snr" / subject / label.replace("=", ""), steps,
                                            gamma)
                    pipe = load_generation_pipeline(None, [(str(runs[n]), 1.0)])
                    cached(path, lambda p=pipe, s=subject: bench_eval(ctx, p, s))
                    del pipe
                res = json.loads(path.read_text())
                rows.append({"experiment": "min-snr", "variant": label, "steps": n, "subject": subject, **res})
        print(f"min-snr: {subject} done ({time.strftime('%H:%M:%S')})", flush=True)
    return rows


def mean_rows(rows: list[dict], keys: tuple, metrics: tuple) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = {**dict(zip(keys, key)), "subject": "mean", "n_subjects": len(rs)}
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        out.append({**rs[0], **row})
    return out


def print_snr(rows: list[dict], gamma_label: str) -> None:
    means = {(r["variant"], r["steps"]): r for r in mean_rows(rows, ("experiment", "variant", "steps"),
                                                                 ("DINO", "CLIP-I", "CLIP-T", "DIV", "instance DINO",
                                                                  "instance CLIP-I"))}
    per = {(r["variant"], r["steps"], r["subject"]): r for r in rows}
    subjects = sorted({r["subject"] for r in rows})
    steps = sorted({r["steps"] for r in rows if r["steps"]})
    b = means[("base model", 0)]
    print(f"\nmin-SNR on mini: means over {len(subjects)} subjects ({', '.join(subjects)})")
    print(f"| steps | off: DINO / CLIP-I / CLIP-T | {gamma_label}: DINO / CLIP-I / CLIP-T | instance-prompt DINO off / "
          f"{gamma_label} | subjects with higher DINO at {gamma_label} |")
    print("|---|---|---|---|---|")
    print(f"| 0 (base model) | {b['DINO']:.3f} / {b['CLIP-I']:.3f} / {b['CLIP-T']:.3f} | | {b['instance DINO']:.3f} | |")
    for n in steps:
        o, g = means[("off", n)], means[(gamma_label, n)]
        wins = sum(per[(gamma_label, n, s)]["DINO"] > per[("off", n, s)]["DINO"] for s in subjects)
        print(f"| {n} | {o['DINO']:.3f} / {o['CLIP-I']:.3f} / {o['CLIP-T']:.3f} | {g['DINO']:.3f} / "
              f"{g['CLIP-I']:.3f} / {g['CLIP-T']:.3f} | {o['instance DINO']:.3f} / {g['instance DINO']:.3f} | "
              f"{wins} of {len(subjects)} |")
    print("\nper subject, DINO (off / " + gamma_label + "):")
    print("| subject | base | " + " | ".join(str(n) for n in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for s in subjects:
        cells = [f"{per[('off', n, s)]['DINO']:.3f} / {per[(gamma_label, n, s)]['DINO']:.3f}" for n in steps]
        print(f"| {s} | {per[('base model', 0, s)]['DINO']:.3f} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------------------------- masked loss

def build_variant(out: Path, subjects: list[str], bg: str, seed: int) -> Path:
    """Each subject's emoji drawn 5 times (size 34-60 px, anywhere, sometimes rotated up to 10°, as
    build_dataset draws them) on the same plain background, with NAME.mask.png from the emoji's alpha."""
    import numpy as np
    from PIL import Image

    from boothkit.mini.emoji import SIZE, load_fluent
    from boothkit.mini.scenes import BACKGROUNDS, background, paste
    from boothkit.mini.subjects import PHOTOS, SUBJECTS

    if BACKGROUNDS[bg][2] != "plain":
        raise SystemExit(f"--mask-background {bg!r}: pick a plain one ({', '.join(BACKGROUNDS)})")
    names = [SUBJECTS[s][0] for s in subjects]
    emoji = {e.name: e for e in load_fluent(names)}
    for s in subjects:
        folder = out / s
        if folder.is_dir() and len(list(folder.glob("*.mask.png"))) == PHOTOS:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rgba = emoji[SUBJECTS[s][0]].image
        white = rgba.copy()
        white[..., :3] = 255
        for i in range(PHOTOS):
            rng = random.Random(f"{seed}-{s}-{bg}:{i}")
            img = background(bg, rng)
            size = rng.randint(34, 60)
            x, y = rng.randint(-2, SIZE - size + 2), rng.randint(-2, SIZE - size + 2)
            angle = rng.uniform(-10, 10) if rng.random() < 0.3 else 0.0
            paste(img, rgba, x, y, size, angle)
            mask = np.zeros((SIZE, SIZE, 3), np.uint8)
            paste(mask, white, x, y, size, angle)  # the alpha, white on black
            Image.fromarray(img).save(folder / f"{i:02d}.png")
            Image.fromarray(mask[..., 0]).save(folder / f"{i:02d}.mask.png")
    return out


LEAK_METRICS = ("leak", "leak (loose)", "ring distance")


def ring_stats(img, colour, ring: int, tolerance: float, loose: float) -> dict:
    """The border ring (outer `ring` px) against the background colour: the share of its pixels within
    `tolerance` and within `loose` (RGB distance), and the median distance."""
    import numpy as np

    arr = np.asarray(img.convert("RGB"), np.float32)
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    on_ring = np.minimum(np.minimum(xx, yy), np.minimum(w - 1 - xx, h - 1 - yy)) < ring
    d = np.linalg.norm(arr[on_ring] - np.asarray(colour, np.float32), axis=-1)
    return {"leak": float((d < tolerance).mean()), "leak (loose)": float((d < loose).mean()),
            "ring distance": float(np.median(d))}


def mean_stats(images, colour, a: argparse.Namespace) -> dict:
    stats = [ring_stats(i, colour, a.ring, a.tolerance, a.loose_tolerance) for i in images]
    return {k: sum(s[k] for s in stats) / len(stats) for k in LEAK_METRICS}


def run_mask(ctx: Ctx) -> list[dict]:
    from boothkit.mini.scenes import BACKGROUNDS

    a = ctx.a
    bg = a.mask_background
    colour = BACKGROUNDS[bg][0]
    subjects = csv_list(a.mask_subjects)
    root = ctx.out / "mask"
    photos = build_variant(root / "photos" / bg.replace(" ", "_"), subjects, bg, a.seed)
    templates = [t.strip() for t in a.leak_prompts.split("|") if t.strip()]
    rows = []
    for subject in subjects:
        rows += mask_subject(ctx, subject, photos, colour, templates)
        print(f"masked-loss: {subject} done ({time.strftime('%H:%M:%S')})", flush=True)
    return rows


def mask_subject(ctx: Ctx, subject: str, photos: Path, colour, templates: list[str]) -> list[dict]:
    """Base model, base model with the background named, and both trainings of one subject, measured."""
    from boothkit.evaluate.bench import train_subject
    from boothkit.generate.generation import load_generation_pipeline, make_grid

    a, bg, root, rows = ctx.a, ctx.a.mask_background, ctx.out / "mask", []
    noun = ctx.ds.classes[subject]
    prompts = [" ".join(t.format(token=ctx.token, noun=noun).split()) for t in templates]
    real, train_photos = ctx.real(subject), ctx.real(subject, photos / subject)

    def measure(pipe, prompt_list):
        t0 = time.perf_counter()
        images = {p: ctx.generate(pipe, p, a.leak_images) for p in prompt_list}
        ctx.timed("mask: sampling", t0)
        every = [img for imgs in images.values() for img in imgs]
        res = {"by_prompt": {p: mean_stats(imgs, colour, a) for p, imgs in images.items()},
               "all": mean_stats(every, colour, a),
               "subject": ctx.fidelity(every, real), "training photos": ctx.fidelity(every, train_photos),
               "n_images": len(every)}
        (root / "grids").mkdir(parents=True, exist_ok=True)
        return res, make_grid(every, a.leak_images)

    def evaluation(name, make_pipe, prompt_list):
        path = root / "evals" / subject / f"{name}.json"

        def make():
            res, grid = measure(make_pipe(), prompt_list)
            grid.save(root / "grids" / f"{subject}-{name}.png")
            return res
        return cached(path, make)

    results = {"base model": evaluation("base", ctx.base_pipe, prompts),
               f"base model, prompt names {bg}": evaluation(
                   "base-named", ctx.base_pipe, [f"an emoji of {ctx.token} {noun} on a {bg} background"])}
    runs = {"trained, no mask": ("unmasked", {})}
    for rule in csv_list(a.mask_rules):
        mean, outside = rule.split(":")
        label = f"trained, --masked-loss --mask-mean {mean}" + (f" --mask-outside {outside}" if float(outside) else "")
        runs[label] = (f"masked-{mean}-{outside}", {"masked_loss": True, "mask_mean": mean,
                                                     "mask_outside": float(outside)})
    for label, (name, extra) in runs.items():
        out = root / subject / name

        def make_pipe(out=out, extra=extra):
            t0 = time.perf_counter()
            ov = ctx.overrides(subject, photos / subject, out, max_steps=a.mask_steps, **extra)
            train_subject(ctx.train_values, ov, out, separate_process=False, progress=False)
            ctx.timed("mask: training", t0)
            return load_generation_pipeline(None, [(str(out), 1.0)])
        results[label] = evaluation(name, make_pipe, prompts)
    rows.append({"experiment": "masked-loss", "variant": "training photos", "subject": subject,
                 "prompt": "(the 5 photos)", **mean_stats(train_photos, colour, a),
                 "n_images": len(train_photos)})
    for label, res in results.items():
        steps = 0 if label.startswith("base") else a.mask_steps
        rows.append({"experiment": "masked-loss", "variant": label, "subject": subject, "steps": steps,
                     "prompt": "all", **res["all"], "n_images": res["n_images"],
                     "DINO": res["subject"]["DINO"], "CLIP-I": res["subject"]["CLIP-I"],
                     "DINO to training photos": res["training photos"]["DINO"],
                     "CLIP-I to training photos": res["training photos"]["CLIP-I"]})
        for p, v in res["by_prompt"].items():
            generic = p.replace(ctx.token, "{token}").replace(f" {noun}", " {noun}", 1)
            rows.append({"experiment": "masked-loss", "variant": label, "subject": subject, "steps": steps,
                         "prompt": generic, **v, "n_images": a.leak_images})
    return rows


MASK_METRICS = LEAK_METRICS + ("DINO", "CLIP-I", "DINO to training photos", "CLIP-I to training photos")


def print_mask(rows: list[dict], a: argparse.Namespace) -> None:
    subjects = sorted({r["subject"] for r in rows})
    by = {(r["variant"], r["prompt"]): r for r in mean_rows(rows, ("experiment", "variant", "prompt"), MASK_METRICS)}
    prompts = [p for p in dict.fromkeys(r["prompt"] for r in rows)
               if p not in ("all", "(the 5 photos)") and a.mask_background not in p]
    print(f"\nmasked loss on mini: every training photo on a {a.mask_background} background; means over "
          f"{len(subjects)} subjects ({', '.join(subjects)}), {a.leak_images} images per prompt")
    print(f"border ring = outer {a.ring} px; cells: share of its pixels within RGB distance {a.tolerance:g} / "
          f"{a.loose_tolerance:g} of the background colour (median distance of its pixels)")
    print("| model | " + " | ".join(prompts) + " | DINO / CLIP-I to the subject | DINO to the training photos |")
    print("|---|" + "---|" * (len(prompts) + 2))
    f = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    cell = lambda r: f"{r['leak']:.2f} / {r['leak (loose)']:.2f} ({r['ring distance']:.0f})"  # noqa: E731
    for variant in dict.fromkeys(r["variant"] for r in rows):
        if variant == "training photos":
            print(f"| training photos | {cell(by[(variant, '(the 5 photos)')])} | | | | |")
            continue
        r = by[(variant, "all")]
        if variant.startswith("base model, prompt names"):
            cells = f"(prompt names it) {cell(r)} |" + " |" * (len(prompts) - 1)
        else:
            cells = " | ".join(cell(by[(variant, p)]) for p in prompts) + " |"
        print(f"| {variant} | {cells} {f(r['DINO'])} / {f(r['CLIP-I'])} | {f(r['DINO to training photos'])} |")
    print("\nper subject, first prompt (" + prompts[0] + "), loose share (median distance): " + "; ".join(
        f"{s}: " + ", ".join(f"{r['variant']} {r['leak (loose)']:.2f} ({r['ring distance']:.0f})" for r in rows
                             if r["subject"] == s and r["prompt"] == prompts[0]) for s in subjects))
    print("per subject, DINO to the subject: " + "; ".join(
        f"{s}: " + ", ".join(f"{r['variant']} {r['DINO']:.3f}" for r in rows
                             if r["subject"] == s and r["prompt"] == "all") for s in subjects))


# ------------------------------------------------------------------------------------------------- main

COLUMNS = ["experiment", "variant", "steps", "subject", "n_subjects", "prompt", "n_images", "DINO", "CLIP-I",
           "CLIP-T", "DIV", "instance DINO", "instance CLIP-I", "leak", "leak (loose)", "ring distance",
           "DINO to training photos", "CLIP-I to training photos"]


def write_csv(path: Path, rows: list[dict]) -> None:
    """The rows of the experiments this invocation ran, beside the CSV's rows of those it did not (--part)."""
    from boothkit.evaluate.experiment import write_rows

    ran = {r["experiment"] for r in rows}
    kept = []
    if path.is_file():
        with path.open(newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if r["experiment"] not in ran]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(path, [{c: r.get(c) for c in COLUMNS} for r in kept + rows])


def main(argv=None) -> None:
    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from boothkit.core.precision import cpu_description

    start = time.perf_counter()
    ctx = Ctx(a)
    print(f"machine: {cpu_description()[0]}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, {platform.machine()}; model {ctx.model}, fp32", flush=True)
    rows: list[dict] = []
    if a.part in ("both", "snr"):
        snr = run_snr(ctx)
        print_snr(snr, f"γ={a.snr_gamma:g}")
        rows += snr + mean_rows(snr, ("experiment", "variant", "steps"),
                                ("DINO", "CLIP-I", "CLIP-T", "DIV", "instance DINO", "instance CLIP-I"))
    if a.part in ("both", "mask"):
        mask = run_mask(ctx)
        print_mask(mask, a)
        rows += mask + mean_rows(mask, ("experiment", "variant", "prompt"), MASK_METRICS)
    write_csv(Path(a.csv), rows)
    print(f"\nCSV: {a.csv}")
    print("wall time (this invocation): " + ", ".join(f"{k} {v:.0f} s" for k, v in ctx.timings.items())
          + f"; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
