"""Does the identifier bind on `mini`? Recipe variants on held-out subjects, judged by real LPIPS beside mini's towers.

For each subject (held-out styles: Fluent UI, OpenMoji), seed and recipe variant: train, then draw the identifier
prompt, the class prompt and the identifier in the seed experiment's three scenes (6 fixed seeds each), and
judge them against the base model's pictures of the same prompts (boothkit.evaluate.binding); sheet.png beside each
judgement shows the photos, base and trained pictures of both prompts, and the scenes: likeness of the identifier
prompt, drift of the class prompt, scene fidelity. A variant binds (issue 30) when, averaged over subjects, the
identifier's LPIPS to the subject falls by >= 0.08 while the class prompt's falls by <= a quarter of that.

    .venv/bin/python benchmarks/binding_mini.py --out out/binding --variants default,unet-only --seeds 0
    .venv/bin/python benchmarks/binding_mini.py --out out/binding --table   # the table of what is measured

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
from boothkit.generate.generation import load_generation_pipeline
from boothkit.evaluate.metrics import Evaluators, MetricsConfig
from boothkit.evaluate.speed import machine
from boothkit.mini.subjects import dataset_dir, openmoji_dataset_dir
from boothkit.train.loop import train_once

FLUENT = ["dog", "cat", "teddy_bear", "backpack", "car", "cup", "baby", "man"]  # the demo's girl left out
# What every variant shares: mini's captions' words, class images made once per class noun and reused.
COMMON = {"model": "mini", "instance_prompt": "an emoji of {token} {class_noun}",
          "class_prompt": "an emoji of a {class_noun}", "mixed_precision": "no", "token": "sks"}
VARIANTS = {  # name -> config values over the model's preset (presets/mini.toml), as flags would give them
    "default": {},  # the preset: what `boothkit train --model mini` uses
    "noise-target": {"prior_target": "images"},  # the paper's prior target: the noise that made the class image
    "te-5e-5": {"text_encoder_lr": 5e-5},  # the SD default for the text encoder
    "unet-only": {"train_text_encoder": False},
    "no-prior": {"prior": False},
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
            values = {**COMMON, **VARIANTS[variant]}
            token = values["token"]
            prompts = binding.binding_prompts(C.fill(values["instance_prompt"], token=token, class_noun=noun),
                                              C.fill(values["class_prompt"], class_noun=noun))
            if prompts.identifier not in base_cache:
                base_pipe = load_generation_pipeline("mini", [])
                base_cache[prompts.identifier] = binding.draw(base_pipe, prompts, args.images)
            for seed in map(int, args.seeds.split(",")):
                where = out / label.replace(":", "-") / variant / f"seed{seed}"
                if (where / "judged.json").is_file() and (where / "sheet.png").is_file():
                    continue
                t0 = time.monotonic()
                run = train({**values, "instance_dir": str(folder), "class_noun": noun, "seed": seed,
                             "class_dir": str(out / "class" / class_folder(values, noun))}, where / "run")
                trained = time.monotonic() - t0
                pipe = load_generation_pipeline(None, [(str(run), 1.0)])
                drawn = binding.draw(pipe, prompts, args.images)
                m = binding.judge(ev, drawn, base_cache[prompts.identifier], photos, prompts)
                png = io.BytesIO()
                binding.sheet(photos, drawn, base_cache[prompts.identifier], prompts).save(png, format="PNG")
                atomic_write_bytes(where / "sheet.png", png.getvalue())
                m.update(subject=label, variant=variant, seed=seed, train_s=round(trained, 1), **binding.summary(m))
                atomic_write_bytes(where / "judged.json", json.dumps(m, indent=1).encode())
                print(f"{label:>20} {variant:<20} seed {seed}: identifier {m['likeness_lpips_base']:.3f} -> "
                      f"{m['likeness_lpips']:.3f}, class {m['class_lpips_base']:.3f} -> {m['class_lpips']:.3f} "
                      f"(moved {m['class_moved_lpips']:.3f}), DINO {m['DINO']:.3f}, {trained:.0f} s", flush=True)


def div(rows: list[dict]) -> str:
    have = [r["DIV"] for r in rows if r.get("DIV") is not None]
    return f"{mean(have):.3f}" if have else "–"


def table(out: Path, csv: str) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*/judged.json"))]
    if csv:
        write_rows(Path(csv), rows, fieldnames=sorted({k for r in rows for k in r}))
    print(f"\n{machine()}; {len(rows)} runs\n")
    print("| variant | subjects × seeds | identifier LPIPS gain ↑ | class LPIPS gain (drift) ↓ | class moved ↓ | "
          "binds | DINO | class DINO | scene CLIP-T (base) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        per_subject = {}
        for r in mine:
            per_subject.setdefault(r["subject"], []).append(r)
        gains = [mean(r["identifier_gain"] for r in rs) for rs in per_subject.values()]
        drift = [mean(r["class_gain"] for r in rs) for rs in per_subject.values()]
        seeds_sd = [stdev([r["identifier_gain"] for r in rs]) for rs in per_subject.values() if len(rs) > 1]
        g, d = mean(gains), mean(drift)
        ok = "yes" if g >= 0.08 and d <= 0.25 * g else "no"
        sd = f" (seed sd {mean(seeds_sd):.3f})" if seeds_sd else ""
        print(f"| {variant} | {len(per_subject)} × {len(mine) // len(per_subject)} | {g:.3f}{sd} | {d:.3f} | "
              f"{mean(r['class_moved_lpips'] for r in mine):.3f} | {ok} | {mean(r['DINO'] for r in mine):.3f} | "
              f"{mean(r['class_DINO'] for r in mine):.3f} | {div(mine)} | {mean(r['scene_CLIP-T'] for r in mine):.3f} "
              f"({mean(r['scene_CLIP-T_base'] for r in mine):.3f}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", default="all", help="'all', or labels such as fluent:dog,openmoji:*")
    ap.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--images", type=int, default=6, help="seeded pictures per prompt")
    ap.add_argument("--table", action="store_true", help="only print the table of what is measured")
    ap.add_argument("--csv", default="")
    args = ap.parse_args()
    if not args.table:
        measure(args, Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64)))
    table(Path(args.out), args.csv)


if __name__ == "__main__":
    main()
