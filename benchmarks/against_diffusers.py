"""boothkit's DreamBooth LoRA training beside diffusers' examples/dreambooth/train_dreambooth_lora.py, on this machine.

Same model folder (sd15-shape unless --model), same photos, same resolution, batch 1 subject + 1 class picture, LoRA
(rank 4) on the UNet only. Every measurement is its own process, started through a fresh wrapper process that
reports the child's wall time and peak RSS (getrusage of its children). A step is timed without set-up: each side
trains N1 and N2 steps with a full class folder, step = (wall(N2) - wall(N1)) / (N2 - N1). A class image with each
side's defaults: wall(run whose class folder is empty) - wall(the same run again, the folder now full), per image.
Usage: python benchmarks/against_diffusers.py --script PATH/train_dreambooth_lora.py [--out DIR] [--precisions fp32,bf16]
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRECISION = {"fp32": "no", "bf16": "bf16"}  # the flag value both sides take
INSTANCE, CLASS = "a photo of sks girl", "a photo of girl"
CLASS_PICTURES = 4  # already in the class folders of the step-time runs
PRIOR_FREE = ["--prior-target", "frozen", "--prior-images", "subject"]


def busy_seconds() -> float:
    """CPU seconds this machine has spent busy since boot, every process together (/proc/stat)."""
    import os

    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def wrap(log: str, cmd: list[str]) -> None:
    """The wrapper process: run `cmd` (output to `log`), then print as JSON its wall time, peak RSS, CPU time,
    and the CPU time everything else on the machine took meanwhile (a busy machine makes the numbers wrong)."""
    with open(log, "w") as fh:
        start, busy = time.perf_counter(), busy_seconds()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
        wall, busy = time.perf_counter() - start, busy_seconds() - busy
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": wall, "rc": rc, "peak_mib": use.ru_maxrss / 1024,
                      "cpu_seconds": use.ru_utime + use.ru_stime,
                      "others_cpu_seconds": max(0.0, busy - use.ru_utime - use.ru_stime)}))


def warm_up(a) -> None:
    """Untimed: both sides' imports and the model's files once, so the first timed run does not pay for a cold
    disk cache."""
    for cmd in ([sys.executable, a.script, "--help"], [sys.executable, "-m", "boothkit", "train", "--help"]):
        subprocess.run(cmd, capture_output=True, check=True)
    for f in Path(a.model_dir).rglob("*"):
        if f.is_file():
            f.read_bytes()


def measure(cmd: list[str], log: Path) -> dict:
    """One child through a fresh wrapper; stops the benchmark when the child fails."""
    proc = subprocess.run([sys.executable, __file__, "--wrap", str(log), "--", *cmd], capture_output=True, text=True,
                          check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["rc"] != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed (exit {got['rc']}): {' '.join(cmd)}\n{tail}")
    print(f"  {log.stem}: {got['seconds']:.1f} s, peak RSS {got['peak_mib']:.0f} MiB, others on the machine "
          f"{got['others_cpu_seconds']:.1f} CPU s", flush=True)
    return got


def diffusers_cmd(a, out: Path, steps: int, precision: str, class_dir: Path, images: int) -> list[str]:
    return [sys.executable, a.script, "--pretrained_model_name_or_path", a.model_dir, "--instance_data_dir", a.photos,
            "--instance_prompt", INSTANCE, "--class_prompt", CLASS, "--class_data_dir", str(class_dir),
            "--with_prior_preservation", "--num_class_images", str(images), "--train_batch_size", "1",
            "--resolution", str(a.resolution), "--max_train_steps", str(steps), "--mixed_precision",
            PRECISION[precision], "--checkpointing_steps", "1000000", "--output_dir", str(out)]


def boothkit_cmd(a, out: Path, steps: int, precision: str, class_dir: Path, images: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "boothkit", "train", "--model", a.model_dir, "--instance-dir", a.photos,
            "--token", "sks", "--class-noun", "girl", "--resolution", str(a.resolution), "--rank", "4", "--alpha", "4",
            "--batch-size", "1", "--max-steps", str(steps), "--mixed-precision", PRECISION[precision],
            "--class-dir", str(class_dir), "--num-class-images", str(images), "--checkpoint-every", "0",
            "--validate-every", "0", "--output-dir", str(out), "--overwrite", *extra]


def class_pictures(folder: Path, count: int) -> Path:
    """`count` seeded 512 px pictures (what class images are does not change a step's cost)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / f"class-{i:05d}.png")
    return folder


def step_time(a, side: str, precision: str, work: Path, extra=()) -> dict:
    """Seconds per step and set-up seconds from an N1- and an N2-step run; peak RSS of the N2 run."""
    name = f"{side}-{precision}" + ("-prior-free" if extra else "")
    class_dir = class_pictures(work / f"class-{name}", CLASS_PICTURES)
    runs = {}
    for n in a.steps:
        make = diffusers_cmd if side == "diffusers" else boothkit_cmd
        args = (a, work / f"out-{name}-{n}", n, precision, class_dir, CLASS_PICTURES) + ((extra,) if extra else ())
        runs[n] = measure(make(*args), work / f"{name}-{n}-steps.log")
    n1, n2 = a.steps
    step = (runs[n2]["seconds"] - runs[n1]["seconds"]) / (n2 - n1)
    return {"side": side, "precision": precision, "prior": "frozen, subject pictures" if extra else "class images",
            "seconds_per_step": step, "setup_seconds": runs[n1]["seconds"] - n1 * step,
            "peak_mib": max(r["peak_mib"] for r in runs.values()), "runs": {str(n): runs[n] for n in runs}}


def class_image_time(a, side: str, precision: str, images: int, work: Path) -> dict:
    """Seconds per class image with the side's own defaults: the same run twice, first on an empty folder."""
    from PIL import Image

    name, class_dir = f"{side}-{precision}-class", work / f"class-{side}-{precision}-made"
    runs = {}
    for phase in ("empty", "full"):
        out = work / f"out-{name}-{phase}"
        cmd = (diffusers_cmd if side == "diffusers" else boothkit_cmd)(a, out, 1, precision, class_dir, images)
        runs[phase] = measure(cmd, work / f"{name}-{phase}.log")
    made = [p for p in class_dir.iterdir() if p.suffix.lower() in (".png", ".jpg")]
    size = Image.open(made[0]).size if made else None
    return {"side": side, "precision": precision, "images": images, "image_size": size,
            "seconds_per_image": (runs["empty"]["seconds"] - runs["full"]["seconds"]) / images, "runs": runs}


def time_to_subject(steps: dict, classes: dict, images: int = 100, n: int = 800) -> list[dict]:
    """A run as a user starts it: minutes for set-up + class images + n steps, and its peak RSS (training's, or
    making the class images', the larger)."""
    rows = []
    for (side, precision, free), s in steps.items():
        made = classes.get((side, precision), classes.get((side, "fp32")))
        rows.append({"side": side, "precision": precision, "class_images": 0 if free else images,
                     "prior": "frozen, subject pictures (no class images)" if free else f"{images} class images",
                     "minutes": (s["setup_seconds"] + (0 if free else images * made["seconds_per_image"])
                                 + n * s["seconds_per_step"]) / 60,
                     "peak_mib": s["peak_mib"] if free else max(s["peak_mib"], made["runs"]["empty"]["peak_mib"])})
    return rows


def cpu_tag() -> str:
    from boothkit.core.precision import cpu_description, native_cpu_bf16

    words = [w for w in re.sub(r"[^a-z0-9]+", " ", cpu_description()[0].lower()).split() if w not in ("amd", "intel")]
    return "-".join(words[:2] or ["cpu"]) + ("-avx512bf16" if native_cpu_bf16() else "-no-avx512bf16")


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}×" if b else ""


def markdown(r: dict) -> str:
    """The three tables, each under the machine line."""
    head = f"machine: {r['machine']}\n{r['settings']}\n\n"
    ref = {(s["precision"]): s for s in r["steps"] if s["side"] == "diffusers"}
    lines = [head + "| side | precision | prior | s / step | set-up (s) | peak RSS (MiB) | step vs diffusers | "
                    "peak RSS vs diffusers |", "|---|---|---|---|---|---|---|---|"]
    for s in r["steps"]:
        d = ref.get(s["precision"]) if s["side"] == "boothkit" else None
        step_ratio, peak_ratio = (_ratio(s[k], d and d[k]) for k in ("seconds_per_step", "peak_mib"))
        lines.append(f"| {s['side']} | {s['precision']} | {s['prior']} | {s['seconds_per_step']:.2f} | "
                     f"{s['setup_seconds']:.0f} | {s['peak_mib']:.0f} | {step_ratio} | {peak_ratio} |")
    lines += ["", head + "| side | precision | class-image defaults | image size | s / image |", "|---|---|---|---|---|"]
    for c in r["class_images"]:
        lines.append(f"| {c['side']} | {c['precision']} | {r['class_defaults'][c['side']]} | "
                     f"{'x'.join(map(str, c['image_size'] or ()))} | {c['seconds_per_image']:.1f} |")
    base = next(t for t in r["time_to_subject"] if t["side"] == "diffusers" and t["precision"] == "fp32")
    lines += ["", head + "| time to subject (set-up + class images + 800 steps) | minutes | vs diffusers' defaults | "
                         "peak RSS (MiB) | vs diffusers' defaults |", "|---|---|---|---|---|"]
    for t in r["time_to_subject"]:
        minutes, peak = (_ratio(t[k], base[k]) for k in ("minutes", "peak_mib"))
        lines.append(f"| {t['side']}, {t['precision']}, {t['prior']} | {t['minutes']:.1f} | {minutes} | "
                     f"{t['peak_mib']:.0f} | {peak} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in r["notes"]) + "\n"


def script_facts(path: str) -> dict:
    import hashlib

    text = Path(path).read_text()
    found = re.search(r'^check_min_version\("([^"]+)"\)', text, re.M)
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "check_min_version": found.group(1) if found else None}


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "diffusers", "transformers", "peft", "accelerate"))


def run(a) -> dict:
    steps, classes = {}, {}
    with tempfile.TemporaryDirectory(prefix="against-diffusers-") as tmp:
        work = Path(tmp)
        warm_up(a)
        for precision in a.precisions:
            for side in ("diffusers", "boothkit"):
                print(f"{side}, {precision}: step time", flush=True)
                steps[(side, precision, False)] = step_time(a, side, precision, work)
            print(f"boothkit, {precision}, prior without class images: step time", flush=True)
            steps[("boothkit", precision, True)] = step_time(a, "boothkit", precision, work, PRIOR_FREE)
        if a.reuse_class_images:  # the slow part (diffusers: minutes per image), from an earlier result file
            earlier = json.loads(Path(a.reuse_class_images).read_text())["class_images"]
            return {"steps": steps, "classes": {(c["side"], c["precision"]): c for c in earlier}}
        for precision in a.precisions:
            print(f"boothkit, {precision}: class images with its defaults", flush=True)
            classes[("boothkit", precision)] = class_image_time(a, "boothkit", precision, a.class_images, work)
        print("diffusers: class images with its defaults (fp32 on a CPU, whatever --mixed_precision)", flush=True)
        classes[("diffusers", "fp32")] = class_image_time(a, "diffusers", "fp32", 1, work)
    return {"steps": steps, "classes": classes}


CLASS_DEFAULTS = {"diffusers": "model's own scheduler, 50 steps, model's native size, fp32 on a CPU",
                  "boothkit": "dpm++2m-karras, 20 steps, training size, training precision"}
NOTES = [
    "diffusers' script otherwise runs with its defaults: the VAE and text encoder run on every step (no latent or "
    "prompt cache) and stay in memory, and after training it reloads the whole pipeline to load the LoRA (counted "
    "in its set-up and peak RSS); boothkit caches latents and prompt embeddings and frees the VAE and text encoder.",
    "Set-up = wall(N1 steps) - N1 x step: process start, loading, caching, saving. Peak RSS: the larger of the two "
    "runs, whole process.",
    "Class image = (wall of a run whose class folder is empty - wall of the same run with it full) / images made; it "
    "includes loading the generation pipeline once. diffusers was timed on 1 image at batch 1 (its "
    "--sample_batch_size default is 4; per image assumed equal on a compute-bound CPU); boothkit on --class-images "
    "images at its default batch (min(4, images)). diffusers makes class images at the model's native size (512 px "
    "for SD 1.5) whatever --resolution, in fp32 on a CPU whatever --mixed_precision.",
    "Time to subject = set-up + 100 class images + 800 steps, from the rates above. Both sides at batch 1 subject + "
    "1 class picture (the script's argparse default --train_batch_size is 4; its README's example uses 1). "
    "boothkit's defaults: --mixed-precision auto picks bf16 on CPUs with AVX-512 BF16 (fp32 rows: set explicitly).",
]


def report(a, got: dict, machine_line: str, seconds: float) -> dict:
    import boothkit

    steps = [s for (_, _, _), s in got["steps"].items()]
    runs = [r for s in steps + list(got["classes"].values()) for r in s["runs"].values()]
    worst = max(runs, key=lambda r: r["others_cpu_seconds"] / r["seconds"])
    busy = worst["others_cpu_seconds"] / worst["seconds"]
    settings = (f"model {a.model} ({a.model_dir}), {a.resolution} px, batch 1 subject + 1 class picture, LoRA rank 4 "
                f"(alpha 4) on the UNet's to_q/to_k/to_v/to_out.0; step from {a.steps[0]}- and {a.steps[1]}-step runs; "
                f"{versions()}; diffusers' script: {a.source or a.script} (check_min_version "
                f"{script_facts(a.script)['check_min_version']})")
    return {"machine": machine_line, "settings": settings, "script": {**script_facts(a.script), "source": a.source},
            "steps": steps, "class_images": list(got["classes"].values()),
            "time_to_subject": time_to_subject(got["steps"], got["classes"]), "class_defaults": CLASS_DEFAULTS,
            "boothkit_source": str(Path(boothkit.__file__).parent),
            "notes": NOTES + [f"Everything else on the machine (the harness and wrappers included) used at most {busy:.3f} "
                              f"CPU-seconds per second of a timed run ({worst['seconds']:.0f} s long)."]
            + ([f"Class-image rates from {a.reuse_class_images}."] if a.reuse_class_images else []),
            "benchmark_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    ap.add_argument("--out", default="against-diffusers", help="output folder")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--model", default="sd15-shape")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", default="2,12", help="N1,N2")
    ap.add_argument("--class-images", type=int, default=2, help="boothkit class images timed (diffusers: 1)")
    ap.add_argument("--reuse-class-images", metavar="JSON", help="class-image rates from an earlier result file")
    ap.add_argument("--source", default="", help="where the script came from (repo, commit), for the tables")
    ap.add_argument("--wrap", help=argparse.SUPPRESS)
    ap.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.wrap:
        return wrap(a.wrap, a.cmd)
    if not a.script:
        ap.error("--script is required")
    from boothkit.core.files import atomic_write_bytes
    from boothkit.models.loading import model_path
    from boothkit.evaluate.speed import machine
    from boothkit.mini.subjects import demo_subject_dir

    a.precisions, a.steps = a.precisions.split(","), [int(n) for n in a.steps.split(",")]
    a.model_dir, a.photos = model_path(a.model), str(demo_subject_dir())
    start = time.perf_counter()
    got = run(a)
    result = report(a, got, machine(), time.perf_counter() - start)
    stem = Path(a.out) / f"against-diffusers-{cpu_tag()}-{a.model}-{a.resolution}"
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(result, indent=2).encode())
    text = markdown(result)
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
