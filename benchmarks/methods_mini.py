"""Adapter kinds and pivotal tuning measured on `mini`, with the DreamBooth recipe everything else uses.

Each held-out emoji subject (src/boothkit/assets/emoji_subjects) trains with examples/mini-dreambooth.toml (rank 8
on UNet + text encoder, prior preservation, 400 steps, lr 1e-3 / 2e-4, fp32) as LoRA, DoRA, LoKr and LoHa
(`--adapter`), and as pivotal tuning (`--method pivotal`: the identifier's new embedding at --ti-lr 5e-3 plus the
LoRA). Each model draws the subject's prompts (the dreambench prompts in mini's words) with fixed seeds, judged by
mini's evaluators as `boothkit bench dreambench` judges them: DINO and CLIP-I to the subject's photos, CLIP-T to
the prompt. Prints a table and writes a CSV.

    .venv/bin/python benchmarks/methods_mini.py --out out/methods-mini --csv docs/methods-mini.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


from boothkit.evaluate import bench
from boothkit.core import config as C
from boothkit.train.data import load_folder
from boothkit.adapters.embeddings import EMBEDDINGS_FILE
from boothkit.evaluate.experiment import write_rows
from boothkit.generate.generation import load_generation_pipeline
from boothkit.adapters.lora import LORA_FILE
from boothkit.evaluate.speed import machine
from boothkit.evaluate.metrics import Evaluators, MetricsConfig, evaluate_images
from boothkit.mini.subjects import dataset_dir
from boothkit.train.loop import train_once

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "mini-dreambooth.toml"
VARIANTS = {"LoRA": {}, "DoRA": {"adapter": "dora"}, "LoKr": {"adapter": "lokr"}, "LoHa": {"adapter": "loha"},
            "pivotal (embedding + LoRA)": {"method": "pivotal"}}


def train(values: dict, out: Path) -> Path:
    # a finished run is reused: the script resumes where it stopped
    cfg = C.resolve(C.TRAIN_SECTIONS, C.load_toml(RECIPE), {**values, "output_dir": str(out), "overwrite": True})
    return train_once(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--csv", default="")
    ap.add_argument("--subjects", default="girl,dog,cat,backpack,car")
    ap.add_argument("--prompts-limit", type=int, default=6)
    ap.add_argument("--images", type=int, default=4, help="seeded images per prompt")
    args = ap.parse_args()

    out, ds = Path(args.out), bench.parse_dataset(dataset_dir())
    ev = Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64))
    rows, start = [], time.monotonic()
    for subject in args.subjects.split(","):
        noun, photos = ds.classes[subject], [img for _, img in load_folder(ds.root / subject)]
        for name, over in VARIANTS.items():
            folder = out / subject / name.split(" ")[0]
            run = train({"instance_dir": str(ds.root / subject), "class_noun": noun,
                         "class_dir": str(out / "class" / noun), **over}, folder / "run")
            assert (run / LORA_FILE).is_file() and ("method" not in over or (run / EMBEDDINGS_FILE).is_file())
            pipe = load_generation_pipeline(None, [(str(run), 1.0)])
            prompts = bench.subject_prompts(ds, subject, "[ktn]", ("dog", "cat"), args.prompts_limit)
            got = bench.load_or_generate(pipe, prompts, folder / "samples", num_images=args.images, seed=0,
                                          steps=25, guidance=7.5, progress=False)
            res = evaluate_images(ev, got, photos)["overall"]
            rows.append({"subject": subject, "variant": name, "DINO": res["DINO"], "CLIP-I": res["CLIP-I"],
                         "CLIP-T": res["CLIP-T"]})
            print(f"{subject:>10} {name:<28} DINO {res['DINO']:.3f} CLIP-I {res['CLIP-I']:.3f} "
                  f"CLIP-T {res['CLIP-T']:.3f}", flush=True)

    n = len(args.subjects.split(","))
    print(f"\n{machine()}; {time.monotonic() - start:.0f} s; {n} subjects, {args.prompts_limit} prompts x "
          f"{args.images} seeds each\n")
    print("| variant | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |\n|---|---|---|---|")
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        print(f"| {name} | " + " | ".join(f"{sum(r[k] for r in mine) / len(mine):.3f}"
                                          for k in ("DINO", "CLIP-I", "CLIP-T")) + " |")
    if args.csv:
        write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
