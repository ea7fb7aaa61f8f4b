"""Does the identifier bind on `mini` (or `mini-flow`, --model)? Recipe variants on held-out subjects, judged by real LPIPS beside mini's towers.

For each subject (held-out styles: Fluent UI, OpenMoji), seed and recipe variant: train, then draw the identifier
prompt, the class prompt and the identifier in the seed experiment's three scenes (6 fixed seeds each), and
judge them against the base model's pictures of the same prompts (boothkit.evaluate.binding); sheet.png beside each
judgement shows the photos, base and trained pictures of both prompts, and the scenes: likeness of the identifier
prompt, drift of the class prompt, scene fidelity. A variant binds (issue 30) when, averaged over subjects, the
identifier's LPIPS to the subject falls by >= 0.08 while the class prompt's falls by <= a quarter of that.

    .venv/bin/python benchmarks/binding_mini.py --out out/binding --variants default,unet-only --seeds 0
    .venv/bin/python benchmarks/binding_mini.py --out out/binding --table   # the table of what is measured
    .venv/bin/python benchmarks/binding_mini.py --model mini-flow --out out/binding-flow --variants default

Every finished run and judgement is kept (run folder + judged.json), so a rerun continues where it stopped.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from statistics import mean, stdev

from boothkit.evaluate import bench, binding
from boothkit.core import config as C
from boothkit.train.data import load_folder
from boothkit.evaluate.experiment import write_rows
from boothkit.core.files import atomic_write_bytes
from boothkit.generate.generation import load_generation_pipeline, set_lora_scales
from boothkit.evaluate.metrics import Evaluators, MetricsConfig
from boothkit.evaluate.speed import machine
from boothkit.mini.subjects import dataset_dir, openmoji_dataset_dir
from boothkit.train.loop import train_once

FLUENT = ["dog", "cat", "teddy_bear", "backpack", "car", "cup", "baby", "man"]  # the demo's girl left out
# What every variant shares: mini's captions' words, class images made once per class noun and reused.
COMMON = {"model": "mini", "instance_prompt": "an emoji of {token} {class_noun}",
          "class_prompt": "an emoji of a {class_noun}", "mixed_precision": "no", "token": "sks"}
VARIANTS = {  # name -> config values over the model's preset (presets/models/<model>.toml), as flags would give them
    "default": {},  # the preset: what `boothkit train --model mini` uses
    "noise-target": {"prior_target": "images"},  # the paper's prior target: the noise that made the class image
    "te-5e-5": {"text_encoder_lr": 5e-5},  # the SD default for the text encoder
    "unet-only": {"train_text_encoder": False},  # the denoiser alone (mini-flow: the transformer)
    "no-prior": {"prior": False},
    "lr-3e-4": {"learning_rate": 3e-4, "text_encoder_lr": 3e-4},  # a transformer's LoRA at a third of mini's rate
    "rank-8-400": {"rank": 8, "alpha": 8.0, "max_steps": 400},
    "lambda-0.5": {"prior_weight": 0.5},
    "20-class": {"num_class_images": 20},
    "conv": {"unet_targets": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]},  # ResNet convolutions too
    "ktn": {"token": "[ktn]"},  # an identifier of four pieces
    "known-word": {"token": "shiny"},  # a word of the vocabulary (never in mini's captions either)
    "pivotal": {"method": "pivotal"},  # a new token whose embedding learns
    "example-2025": {"rank": 8, "alpha": 8.0, "learning_rate": 1e-3, "text_encoder_lr": 2e-4, "max_steps": 400,
                     "prior_target": "images", "class_steps": 25, "class_scheduler": "model"},  # before the preset
}
MEASURES = ("likeness_lpips_base", "likeness_lpips", "class_lpips_base", "class_lpips", "class_moved_lpips", "DINO",
            "CLIP-I", "class_DINO", "scene_CLIP-T_base", "scene_CLIP-T")


def datasets() -> dict[str, Path]:
    return {"fluent": dataset_dir(), "openmoji": openmoji_dataset_dir()}


def subjects(wanted: str) -> list[tuple[str, Path, str]]:
    """(label, folder, class noun) of each subject: 'fluent:dog', 'openmoji:*', or 'all'."""
    out = []
    for style, root in datasets().items():
        ds = bench.parse_dataset(root)
        names = FLUENT if style == "fluent" else sorted(ds.classes)
        for name in names:
            label = f"{style}:{name}"
            if wanted == "all" or label in wanted.split(",") or f"{style}:*" in wanted.split(","):
                out.append((label, root / name, ds.classes[name]))
    return out


def class_folder(values: dict, noun: str) -> str:
    """Class images are shared by every run of one noun and sampler settings (a folder refuses other settings)."""
    return f"{noun}-{values.get('class_scheduler', 'default')}-{values.get('class_steps', 'default')}"


def train(values: dict, out: Path) -> Path:
    # a finished run is reused: the script resumes where it stopped
    return train_once(C.resolve(C.TRAIN_SECTIONS, {}, {**values, "output_dir": str(out), "overwrite": True}))


def measure(args, ev: Evaluators) -> None:
    out = Path(args.out)
    for label, folder, noun in subjects(args.subjects):
        photos = [img for _, img in load_folder(folder)]
        base_cache = {}
        for variant in args.variants.split(","):
            values = {**COMMON, "model": args.model, **VARIANTS[variant]}
            token = values["token"]
            prompts = binding.binding_prompts(C.fill(values["instance_prompt"], token=token, class_noun=noun),
                                              C.fill(values["class_prompt"], class_noun=noun))
            if prompts.identifier not in base_cache:
                base_pipe = load_generation_pipeline(args.model, [])
                base_cache[prompts.identifier] = binding.draw(base_pipe, prompts, args.images)
            for seed in map(int, args.seeds.split(",")):
                trained_in = out / label.replace(":", "-") / variant / f"seed{seed}"
                scale = args.lora_scale  # the pictures of a run drawn at another LoRA scale are judged beside it
                where = trained_in if scale == 1.0 else trained_in.with_name(f"seed{seed}-lora{scale:g}")
                if (where / "judged.json").is_file() and (where / "sheet.png").is_file():
                    continue
                t0 = time.monotonic()
                run = train({**values, "instance_dir": str(folder), "class_noun": noun, "seed": seed,
                             "class_dir": str(out / "class" / class_folder(values, noun))}, trained_in / "run")
                trained = time.monotonic() - t0
                pipe = load_generation_pipeline(None, [(str(run), 1.0)])
                set_lora_scales(pipe, scale, scale)
                drawn = binding.draw(pipe, prompts, args.images)
                m = binding.judge(ev, drawn, base_cache[prompts.identifier], photos, prompts)
                png = io.BytesIO()
                binding.sheet(photos, drawn, base_cache[prompts.identifier], prompts).save(png, format="PNG")
                atomic_write_bytes(where / "sheet.png", png.getvalue())
                m.update(subject=label, variant=variant if scale == 1.0 else f"{variant} at LoRA {scale:g}", seed=seed,
                         train_s=round(trained, 1), **binding.summary(m))
                atomic_write_bytes(where / "judged.json", json.dumps(m, indent=1).encode())
                print(f"{label:>20} {variant:<20} seed {seed}: identifier {m['likeness_lpips_base']:.3f} -> "
                      f"{m['likeness_lpips']:.3f}, class {m['class_lpips_base']:.3f} -> {m['class_lpips']:.3f} "
                      f"(moved {m['class_moved_lpips']:.3f}), DINO {m['DINO']:.3f}, {trained:.0f} s", flush=True)


def div(rows: list[dict]) -> str:
    have = [r["DIV"] for r in rows if r.get("DIV") is not None]
    return f"{mean(have):.3f}" if have else "–"


def variant_rows(rows: list[dict]) -> None:
    """One line per variant: gains averaged per subject first (each subject weighs the same), then over subjects."""
    print("| variant | subjects / runs | identifier LPIPS gain ↑ | class LPIPS gain (drift) ↓ | class moved ↓ | "
          "binds | DINO | class DINO | DIV | scene CLIP-T (base) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        per_subject = {}
        for r in mine:
            per_subject.setdefault(r["subject"], []).append(r)
        seeds_sd = [stdev([r["identifier_gain"] for r in rs]) for rs in per_subject.values() if len(rs) > 1]
        g, d = _means(mine)
        ok = "yes" if g >= 0.08 and d <= 0.25 * g else "no"
        sd = f" (seed sd {mean(seeds_sd):.3f})" if seeds_sd else ""
        print(f"| {variant} | {len(per_subject)} / {len(mine)} | {g:.3f}{sd} | {d:.3f} | "
              f"{mean(r['class_moved_lpips'] for r in mine):.3f} | {ok} | {mean(r['DINO'] for r in mine):.3f} | "
              f"{mean(r['class_DINO'] for r in mine):.3f} | {div(mine)} | {mean(r['scene_CLIP-T'] for r in mine):.3f} "
              f"({mean(r['scene_CLIP-T_base'] for r in mine):.3f}) |")


def subject_rows(rows: list[dict], variant: str) -> None:
    """One line per subject of `variant`, its seeds averaged."""
    print("| subject | seeds | identifier LPIPS base → trained | class LPIPS base → trained | DINO | class DINO |")
    print("|---|---|---|---|---|---|")
    for subject in dict.fromkeys(r["subject"] for r in rows if r["variant"] == variant):
        rs = [r for r in rows if r["variant"] == variant and r["subject"] == subject]
        m = {k: mean(r[k] for r in rs) for k in MEASURES if all(k in r for r in rs)}
        print(f"| {subject} | {len(rs)} | {m['likeness_lpips_base']:.3f} → {m['likeness_lpips']:.3f} | "
              f"{m['class_lpips_base']:.3f} → {m['class_lpips']:.3f} | {m['DINO']:.3f} | {m['class_DINO']:.3f} |")


def _means(rows: list[dict]) -> tuple[float, float]:
    """(identifier gain, class gain) averaged per subject first, then over subjects."""
    per_subject = {}
    for r in rows:
        per_subject.setdefault(r["subject"], []).append(r)
    return (mean(mean(r["identifier_gain"] for r in rs) for rs in per_subject.values()),
            mean(mean(r["class_gain"] for r in rs) for rs in per_subject.values()))


def paired_rows(rows: list[dict], variants: list[str]) -> None:
    print("| variant | runs | identifier LPIPS gain ↑ | class LPIPS gain (drift) ↓ | class moved ↓ | DINO | class DINO | DIV |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        pairs = {(r["subject"], r["seed"]) for r in mine}
        base = [r for r in rows if r["variant"] == "default" and (r["subject"], r["seed"]) in pairs]
        mine = [r for r in mine if (r["subject"], r["seed"]) in {(b["subject"], b["seed"]) for b in base}]
        if not mine:
            continue
        (g, d), (bg, bd) = _means(mine), _means(base)
        pick = lambda rs, k: mean(r[k] for r in rs)  # noqa: E731
        print(f"| {variant} | {', '.join(sorted(r['subject'] for r in mine))} | {g:.3f} ({bg:.3f}) | {d:.3f} ({bd:.3f}) | "
              f"{pick(mine, 'class_moved_lpips'):.3f} ({pick(base, 'class_moved_lpips'):.3f}) | "
              f"{pick(mine, 'DINO'):.3f} ({pick(base, 'DINO'):.3f}) | "
              f"{pick(mine, 'class_DINO'):.3f} ({pick(base, 'class_DINO'):.3f}) | {div(mine)} ({div(base)}) |")


def table(out: Path, csv: str) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*/judged.json"))]  # every LoRA scale
    if csv:
        write_rows(Path(csv), rows, fieldnames=sorted({k for r in rows for k in r}))
    print(f"\n{machine()}; {len(rows)} runs\n\nEvery run:\n")
    variant_rows(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if "default" in variants and len(variants) > 1:
        print("\nEach variant beside the default on the same subject-seed runs (default's numbers in brackets):\n")
        paired_rows(rows, [v for v in variants if v != "default"])
    if "default" in variants:
        print("\nThe default recipe, per subject:\n")
        subject_rows(rows, "default")


def sheet_row(sheet, r: int) -> list:
    """Row r of a binding sheet: square pictures, one row per ROWS entry, as many a row as --images drew."""
    side = sheet.height // len(ROWS)
    return [sheet.crop((c * side, r * side, (c + 1) * side, (r + 1) * side)) for c in range(sheet.width // side)]


def style_control(out: Path, ev: Evaluators) -> None:
    """Is a lower scene CLIP-T the subject's style? mini's CLIP-T to the class prompt ("an emoji of a dog") of the
    subject's own photos, beside the base model's class pictures and the trained identifier pictures (seed 0 of the
    default recipe, cut from its sheet.png: row 2 trained identifier, row 3 base class)."""
    from PIL import Image

    from boothkit.evaluate.metrics import rowwise_cosine

    print("\nmini's CLIP-T to the class prompt: the held-out photos themselves, the base model's class pictures, the "
          "trained identifier pictures (default, seed 0):\n")
    print("| subject | photos | base: class prompt | trained: identifier prompt |")
    print("|---|---|---|---|")
    labels = {label: (folder, noun) for label, folder, noun in subjects("all")}
    for path in sorted(out.glob("*/default/seed0/sheet.png")):
        label = path.parts[-4].replace("-", ":", 1)
        folder, noun = labels[label]
        sheet = Image.open(path).convert("RGB")
        text = ev.clip.text_embeds([C.fill(COMMON["class_prompt"], class_noun=noun)])
        clip_t = {name: float(rowwise_cosine(ev.clip.image_embeds(imgs), text.expand(len(imgs), -1)).mean())
                  for name, imgs in (("photos", [im for _, im in load_folder(folder)]), ("base", sheet_row(sheet, 3)),
                                     ("trained", sheet_row(sheet, 2)))}
        print(f"| {label} | {clip_t['photos']:.3f} | {clip_t['base']:.3f} | {clip_t['trained']:.3f} |")


ROWS = ("subject photos", "base: identifier prompt", "trained: identifier prompt", "base: class prompt",
        "trained: class prompt", "trained: next to a soft ice cream", "trained: next to a full moon",
        "trained: next to a classical building")


def figure(out: Path, variants: list[str], labels: list[str], path: Path) -> None:
    """Seed 0's sheets of each subject in `labels` under each of `variants`, side by side, rows named on the left."""
    from PIL import Image, ImageDraw

    columns = [(label, variant) for label in labels for variant in variants]
    sheets = [Image.open(out / label.replace(":", "-") / variant / "seed0" / "sheet.png").convert("RGB")
              for label, variant in columns]
    w, h = sheets[0].size
    left, top, gap = 230, 24, 12
    fig = Image.new("RGB", (left + len(sheets) * (w + gap), top + h), "white")
    draw = ImageDraw.Draw(fig)
    for k, ((label, variant), sheet) in enumerate(zip(columns, sheets)):
        x = left + k * (w + gap)
        fig.paste(sheet, (x, top))
        draw.text((x + 4, 6), label.replace(":", " ") + ("" if len(variants) == 1 else f", {variant}"), fill="black")
    for r, name in enumerate(ROWS):
        draw.text((6, top + r * (h // len(ROWS)) + h // len(ROWS) // 2 - 6), name, fill="black")
    png = io.BytesIO()
    fig.quantize(256, method=Image.Quantize.MEDIANCUT).save(png, format="PNG", optimize=True)  # a third the bytes
    atomic_write_bytes(path, png.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="mini", choices=("mini", "mini-flow"), help="the emoji model to train on")
    ap.add_argument("--subjects", default="all", help="'all', or labels such as fluent:dog,openmoji:*")
    ap.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--images", type=int, default=6, help="seeded pictures per prompt")
    ap.add_argument("--lora-scale", type=float, default=1.0,
                    help="draw the trained pictures at this LoRA scale (UNet and text encoder); judged beside scale 1")
    ap.add_argument("--table", action="store_true", help="only print the table of what is measured")
    ap.add_argument("--csv", default="")
    ap.add_argument("--figure", default="", help="write seed 0's sheets of --subjects under --variants here (a PNG)")
    args = ap.parse_args()
    if args.figure:
        figure(Path(args.out), args.variants.split(","), args.subjects.split(","), Path(args.figure))
        return
    ev = Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64))
    if not args.table:
        measure(args, ev)
    table(Path(args.out), args.csv)
    style_control(Path(args.out), ev)


if __name__ == "__main__":
    main()
