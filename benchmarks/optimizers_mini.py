"""The training optimizers (`--optimizer adamw | prodigy | adamw-schedulefree | adafactor`) measured on `mini`, with
mini's own recipe (src/boothkit/presets/models/mini.toml: rank 16 on UNet + text encoder, lr 1e-3, prior
preservation with the frozen model as the class target, fp32).

Each held-out emoji subject (src/boothkit/assets/emoji_subjects) trains once per optimizer and step count (`--steps
300,600`: separate runs, so the table shows how far each optimizer gets by 300 and by 600 steps). Each model draws
the subject's prompts (the dreambench prompts in mini's words, identifier "sks") with fixed seeds, judged by mini's
evaluators as `boothkit bench dreambench` judges them: DINO and CLIP-I to the subject's photos, CLIP-T to the prompt.
The untrained base model draws the same prompts as the reference. Per run it also records the training wall time
(a 1-step run draws the class images beforehand, so no timed run includes them; a run reused from an earlier
invocation keeps the time recorded then, marked reused), the last logged training loss and the mean of the last 50,
and, from a short extra run per optimizer (3 steps, a checkpoint each step, the newest kept), the size on disk of the
optimizer state the checkpoint holds (optim.pt). Prints a table and writes a CSV.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optimizers_mini.py --out out/optimizers-mini \\
        --csv docs/optimizers-mini.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from boothkit.adapters.lora import LORA_FILE
from boothkit.core import config as C
from boothkit.evaluate import bench
from boothkit.evaluate.experiment import write_rows
from boothkit.evaluate.metrics import Evaluators, MetricsConfig, evaluate_images
from boothkit.evaluate.speed import machine
from boothkit.generate.generation import load_generation_pipeline
from boothkit.mini.subjects import dataset_dir
from boothkit.train import checkpoint as ckpt
from boothkit.train.data import load_folder
from boothkit.train.loop import final_output, train_once

OPTIMIZERS = ("adamw", "prodigy", "adamw-schedulefree", "adafactor")
BASE = "mini, untrained"
TOKEN = "sks"  # mini's recipe's default identifier
TIME_FILE = "bench_train_seconds.json"  # this script's own record of a run's training time, for reuse


def config(values: dict, out: Path) -> C.RunConfig:
    return C.resolve(C.TRAIN_SECTIONS, {}, {"model": "mini", **values, "output_dir": str(out), "overwrite": True})


def train(values: dict, out: Path) -> tuple[Path, float | None, bool]:
    """The run (a finished one is reused: the script resumes where it stopped), its training seconds, reused?"""
    cfg = config(values, out)
    if final_output(cfg).exists():
        rec = out / TIME_FILE
        return out, (json.loads(rec.read_text())["seconds"] if rec.is_file() else None), True
    t0 = time.monotonic()
    run = train_once(cfg)
    seconds = time.monotonic() - t0
    (run / TIME_FILE).write_text(json.dumps({"seconds": seconds}))
    return run, seconds, False


def losses(run: Path, last: int = 50) -> tuple[float, float]:
    """The last logged training loss, and the mean of the last `last` logged losses."""
    with (run / "train_log.csv").open() as fh:
        got = [float(r["loss"]) for r in csv.DictReader(fh) if r.get("loss")]
    tail = got[-last:]
    return got[-1], sum(tail) / len(tail)


def state_mb(values: dict, out: Path) -> float:
    """Size on disk (MB) of the optimizer state a checkpoint holds, from a 3-step run checkpointed every step (a
    checkpoint is written only before the last step, so 3 steps leave step-0000002, the newest, kept)."""
    run = train_once(config({**values, "max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 1}, out))
    found = ckpt.list_checkpoints(run)
    assert found, f"no checkpoint in {run}"
    return (found[-1][1] / "optim.pt").stat().st_size / 1e6


def evaluate(pipe, ev, ds, subject: str, photos, folder: Path, args) -> dict:
    prompts = bench.subject_prompts(ds, subject, TOKEN, ("dog", "cat"), args.prompts_limit)
    got = bench.load_or_generate(pipe, prompts, folder, num_images=args.images, seed=0, steps=25, guidance=7.5,
                                 progress=False)
    return evaluate_images(ev, got, photos)["overall"]


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--csv", default="")
    ap.add_argument("--subjects", default="dog,backpack")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", default="300,600", help="max_steps of the separate runs per optimizer")
    ap.add_argument("--prompts-limit", type=int, default=4)
    ap.add_argument("--images", type=int, default=4, help="seeded images per prompt")
    args = ap.parse_args()

    out, ds = Path(args.out), bench.parse_dataset(dataset_dir())
    subjects, optimizers = args.subjects.split(","), args.optimizers.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    ev = Evaluators(MetricsConfig(clip_model="mini", dino_model="mini", lpips_size=64))
    rows, state, start = [], {}, time.monotonic()
    for subject in subjects:
        noun, photos = ds.classes[subject], [img for _, img in load_folder(ds.root / subject)]
        data = {"instance_dir": str(ds.root / subject), "class_noun": noun, "class_dir": str(out / "class" / noun)}
        # a 1-step run fills the class folder first, so no timed run below includes drawing the class images
        train_once(config({**data, "max_steps": 1, "checkpoint_every": 0}, out / subject / "class-warmup"))
        res = evaluate(load_generation_pipeline("mini", []), ev, ds, subject, photos, out / subject / "base", args)
        rows.append({"subject": subject, "optimizer": BASE, "steps": 0, "DINO": res["DINO"],
                     "CLIP-I": res["CLIP-I"], "CLIP-T": res["CLIP-T"], "final loss": None,
                     "loss (last 50 mean)": None, "train s": None, "reused": "", "optimizer state (MB)": None})
        print(f"{subject:>9} {BASE:<22}      DINO {res['DINO']:.3f} CLIP-I {res['CLIP-I']:.3f} "
              f"CLIP-T {res['CLIP-T']:.3f}", flush=True)
        for name in optimizers:
            for n in steps:
                folder = out / subject / name / str(n)
                run, seconds, reused = train(
                    {**data, "optimizer": name, "max_steps": n, "checkpoint_every": 0}, folder / "run")
                assert (run / LORA_FILE).is_file()
                if name not in state:  # once per optimizer, after its first (shortest) run
                    state[name] = state_mb({**data, "optimizer": name}, out / "state" / name)
                loss, loss50 = losses(run)
                res = evaluate(load_generation_pipeline(None, [(str(run), 1.0)]), ev, ds, subject, photos,
                               folder / "samples", args)
                rows.append({"subject": subject, "optimizer": name, "steps": n, "DINO": res["DINO"],
                             "CLIP-I": res["CLIP-I"], "CLIP-T": res["CLIP-T"], "final loss": loss,
                             "loss (last 50 mean)": loss50, "train s": seconds, "reused": "yes" if reused else "",
                             "optimizer state (MB)": state[name]})
                print(f"{subject:>9} {name:<18} {n:>5}  DINO {res['DINO']:.3f} CLIP-I {res['CLIP-I']:.3f} "
                      f"CLIP-T {res['CLIP-T']:.3f}  loss {loss:.4f} (last-50 mean {loss50:.4f})  "
                      f"train {fmt(seconds, '.0f') or '?'} s{' (reused)' if reused else ''}  "
                      f"state {state[name]:.2f} MB", flush=True)
            if args.csv:  # after each optimizer, so a stopped run leaves what it measured
                write_rows(Path(args.csv), rows)

    print(f"\n{machine()}; {time.monotonic() - start:.0f} s; {len(subjects)} subjects ({args.subjects}), "
          f"{args.prompts_limit} prompts x {args.images} seeds each\n")
    keys = ("DINO", "CLIP-I", "CLIP-T", "final loss", "loss (last 50 mean)", "train s")
    print("| optimizer | steps | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | final loss | loss (last 50 mean) | train (s) "
          "| optimizer state (MB) |\n|---|---|---|---|---|---|---|---|---|")
    for name, n in [(BASE, 0)] + [(o, n) for o in optimizers for n in steps]:
        mine = [r for r in rows if r["optimizer"] == name and r["steps"] == n]
        means = [None if any(r[k] is None for r in mine) else sum(r[k] for r in mine) / len(mine) for k in keys]
        cells = [fmt(v, ".0f" if k == "train s" else ".4f" if "loss" in k else ".3f") for k, v in zip(keys, means)]
        reused = "reused" if any(r["reused"] for r in mine) else ""
        cells[-1] = f"{cells[-1]} {'(' + reused + ')' if reused else ''}".strip()
        print(f"| {name} | {n or '-'} | " + " | ".join(cells) + f" | {fmt(mine[0]['optimizer state (MB)'], '.2f')} |")
    if args.csv:
        write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
