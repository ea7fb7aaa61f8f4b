"""Several subjects in one run, measured on `mini`: does one LoRA learn two subjects as well as one run each, and
does one subject's identifier draw the other (bleed)?

For each pair of held-out emoji subjects (src/boothkit/assets/emoji_subjects): one run per subject
(examples/mini-dreambooth.toml, --max-steps S) and one joint run of both (--subject twice) at S and 2*S steps
(2*S gives each subject the examples a one-subject run of S steps has). Each subject's prompts (the dreambench
prompts in mini's words, with its own identifier) are sampled from every model with the same seeds and judged by
mini's evaluators: DINO and CLIP-I to its own photos, CLIP-T, and DINO to the *other* subject's photos (bleed).
The base model (no training) gives the reference. Prints a table and writes a CSV.

    .venv/bin/python benchmarks/subjects_mini.py --out out/subjects-mini --csv docs/subjects-mini.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


from boothkit.evaluate import bench
from boothkit.core import config as C
from boothkit.train.data import load_folder
from boothkit.evaluate.experiment import write_rows
from boothkit.generate.generation import load_generation_pipeline
from boothkit.evaluate.speed import machine
from boothkit.evaluate.metrics import Evaluators, MetricsConfig, evaluate_images, mean_pairwise_cosine
from boothkit.mini.subjects import dataset_dir
from boothkit.train.loop import train_once

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "mini-dreambooth.toml"
TOKENS = ("[ktn]", "[zwx]")


def train(values: dict, out: Path) -> Path:
    # a finished run is reused: the script resumes where it stopped
    cfg = C.resolve(C.TRAIN_SECTIONS, C.load_toml(RECIPE), {**values, "output_dir": str(out), "overwrite": True})
    return train_once(cfg)


def sample(run: Path | None, prompts: list[str], folder: Path, images: int) -> list:
    pipe = load_generation_pipeline("mini" if run is None else None, [] if run is None else [(str(run), 1.0)])
    got = bench.load_or_generate(pipe, prompts, folder, num_images=images, seed=0, steps=25, guidance=7.5,
                                  progress=False)
    del pipe
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--csv", default="")
    ap.add_argument("--pairs", default="girl+dog,car+racing_car", help="a+b,c+d: subjects trained together")
    ap.add_argument("--nouns", default="", help="SUBJECT=NOUN,...: a finer class noun for a subject (its prompts, "
                                                "class images and identifier's class), e.g. racing_car=racing car")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--prompts-limit", type=int, default=6)
    ap.add_argument("--images", type=int, default=4, help="seeded images per prompt")
    args = ap.parse_args()

    out, ds = Path(args.out), bench.parse_dataset(dataset_dir())
    ev = Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64))
    photos = {s: [img for _, img in load_folder(ds.root / s)] for p in args.pairs.split(",") for s in p.split("+")}
    rows, start = [], time.monotonic()
    finer = dict(item.split("=", 1) for item in args.nouns.split(",") if item)
    for pair in args.pairs.split(","):
        a, b = pair.split("+")
        nouns = {s: finer.get(s, ds.classes[s]) for s in (a, b)}
        if any(s in finer for s in (a, b)):  # its own runs: the models differ from the dataset nouns' ones
            pair = f"{pair} ({', '.join(f'{s}: {finer[s]}' for s in (a, b) if s in finer)})"
        token = dict(zip((a, b), TOKENS))
        classes = out / "class"  # class images are shared by every run of a class
        joint_classes = classes / nouns[a] if nouns[a] == nouns[b] else classes  # one class: the folder itself
        models: dict[str, dict[str, Path | None]] = {s: {"base": None} for s in (a, b)}
        for s in (a, b):
            models[s]["one run per subject"] = train({"instance_dir": str(ds.root / s), "token": token[s],
                                                      "class_noun": nouns[s], "class_dir": str(classes / nouns[s]),
                                                      "max_steps": args.steps}, out / pair / f"single-{s}")
        for steps in (args.steps, 2 * args.steps):
            run = train({"subjects": [[str(ds.root / s), token[s], nouns[s]] for s in (a, b)],
                         "class_dir": str(joint_classes), "max_steps": steps}, out / pair / f"joint-{steps}")
            for s in (a, b):
                models[s][f"both in one run, {steps} steps"] = run
        for s in (a, b):
            other = b if s == a else a
            prompts = bench.subject_prompts(ds, s, token[s], ("dog", "cat"), args.prompts_limit, noun=nouns[s])
            for name, run in models[s].items():
                folder = out / pair / "samples" / s / name.replace(" ", "_").replace(",", "")
                got = sample(run, prompts, folder, args.images)
                res = evaluate_images(ev, got, photos[s])["overall"]
                bleed = mean_pairwise_cosine(ev.dino.image_embeds([img for _, img in got]),
                                             ev.dino.image_embeds(photos[other]))
                rows.append({"pair": pair, "subject": s, "model": name, "DINO": res["DINO"], "CLIP-I": res["CLIP-I"],
                             "CLIP-T": res["CLIP-T"], "DINO to the other subject": bleed})
                print(f"{pair:>16} {s:>12} {name:<32} DINO {res['DINO']:.3f} CLIP-I {res['CLIP-I']:.3f} "
                      f"CLIP-T {res['CLIP-T']:.3f} other {bleed:.3f}", flush=True)

    print(f"\n{machine()}; {time.monotonic() - start:.0f} s; {args.steps} steps per subject run; "
          f"{args.prompts_limit} prompts x {args.images} seeds per subject\n")
    print("| pair | subject | model | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | DINO to the other subject |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['subject']} | {r['model']} | {r['DINO']:.3f} | {r['CLIP-I']:.3f} | "
              f"{r['CLIP-T']:.3f} | {r['DINO to the other subject']:.3f} |")
    if args.csv:
        write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
