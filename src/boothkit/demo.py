"""`boothkit demo`: the main job end to end on the built-in model and the demo subject.

class images -> LoRA on UNet + text encoder with prior preservation -> the seed experiment's prompts at
guidance 7.5 and 15 with LoRA scales 0.8 / 0.8 -> a folder with images, grids and a summary page.
Every stage is the same function the CLI command of that stage calls.
"""
from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import config as C
from .config import opt

DEMO_PROMPTS = ("an image of {token} {noun} eating ice cream", "an image of {token} {noun} on the moon",
                "an image of {token} {noun} in the acropolis")
GUIDANCES = (7.5, 15.0)
UNET_SCALE = TEXT_ENCODER_SCALE = 0.8


@dataclass(frozen=True)
class DemoConfig:
    out: str = opt("demo-output", "Output folder of the demo.")
    model: str = opt("tiny", "Base model (default: the built-in tiny model with random weights).")
    instance_dir: str = opt("", "Subject photos (default: the demo dog that boothkit ships).")
    token: str = opt("sks", "Identifier of the subject.")
    class_noun: str = opt("dog", "Class noun of the subject.")
    max_steps: int = opt(300, "Training steps.", min=1)
    num_class_images: int = opt(50, "Class images for prior preservation.", min=1)
    num_images: int = opt(4, "Images per prompt and guidance.", min=1)
    steps: int = opt(30, "Sampling steps.", min=1)
    seed: int = opt(0, "Seed of training and sampling.")


DEMO_SECTIONS: dict[str, type] = {"demo": DemoConfig}


def demo_subject_dir() -> Path:
    """The five downscaled photos of one dog shipped with boothkit (see ATTRIBUTION.md there)."""
    return Path(str(resources.files("boothkit") / "assets" / "demo_subject"))


def train_config(d: DemoConfig) -> C.RunConfig:
    out = Path(d.out)
    return C.resolve(C.TRAIN_SECTIONS, {}, {
        "model": d.model, "instance_dir": d.instance_dir or str(demo_subject_dir()), "token": d.token,
        "class_noun": d.class_noun, "output_dir": str(out / "lora"), "class_dir": str(out / "class_images"),
        "num_class_images": d.num_class_images, "class_steps": 20, "class_batch_size": 8, "class_seed": d.seed,
        "train_text_encoder": True, "rank": 8, "alpha": 8.0, "max_steps": d.max_steps, "learning_rate": 1e-4,
        "text_encoder_lr": 5e-5, "seed": d.seed, "validate_every": max(1, d.max_steps // 2), "validation_steps": 20,
        "checkpoint_every": max(1, d.max_steps // 3), "overwrite": True})


def sweep_config(d: DemoConfig) -> C.RunConfig:
    """The seed experiment as one sweep: guidance 7.5 vs 15 at LoRA scales 0.8 / 0.8, plus the rows with either
    LoRA part switched off (scale 0), so the sheets also show what each part contributes."""
    from .sweep import SWEEP_SECTIONS

    prompts = [p.format(token=d.token, noun=d.class_noun) for p in DEMO_PROMPTS]
    return C.resolve(SWEEP_SECTIONS, {}, {
        "lora": str(Path(d.out) / "lora"), "prompt": prompts, "num_images": d.num_images,
        "guidance": ",".join(f"{g:g}" for g in GUIDANCES), "unet_scale": f"0,{UNET_SCALE:g}",
        "text_encoder_scale": f"0,{TEXT_ENCODER_SCALE:g}", "seed": d.seed, "steps": d.steps,
        "out": str(Path(d.out) / "sweep")})


def run_demo(cfg: C.RunConfig) -> Path:
    """Run every stage; returns the summary page's path."""
    from .prior import run_class_images
    from .sweep import run_sweep
    from .train import run_training

    d = cfg.demo
    out = Path(d.out)
    out.mkdir(parents=True, exist_ok=True)
    C.save_toml(out / "demo_config.toml", cfg.to_dict())
    train_cfg = train_config(d)
    timings = []
    t0 = time.perf_counter()
    run_class_images(train_cfg)
    timings.append(("class images", time.perf_counter() - t0))
    t0 = time.perf_counter()
    run_training(train_cfg)
    timings.append((f"training ({d.max_steps} steps)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    sweep = sweep_config(d)
    shutil.rmtree(sweep.sweep.out, ignore_errors=True)  # its cells came from the LoRA this run just replaced
    sweep_dir = run_sweep(sweep)
    timings.append(("generation (sweep)", time.perf_counter() - t0))
    return write_summary(d, train_cfg, sweep_dir, timings)


def _loss_plot(log_csv: Path) -> bytes | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # the summary is still useful without the curve
        return None
    from .report import _figure_png

    with log_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", "instance_loss", "prior_loss"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, lw=0.8)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def write_summary(d: DemoConfig, train_cfg: C.RunConfig, sweep_dir: Path, timings: list[tuple[str, float]]) -> Path:
    """The demo's index.html: what ran, how long it took, the pictures, and how to do it for real."""
    from PIL import Image

    from .data import load_folder
    from .models import is_tiny
    from .report import Report

    out = Path(d.out)
    rep = Report("boothkit demo: DreamBooth LoRA with prior preservation")
    if is_tiny(d.model):
        rep.notice("The built-in tiny model has random weights: these pictures show the pipeline working end to "
                   "end (class images, LoRA training with prior preservation, generation at two guidance scales), "
                   "not image quality. Run the same on a real Stable Diffusion model with --model (see below).")
    rep.heading("What ran").table(
        [{"stage": name, "seconds": f"{sec:.1f}"} for name, sec in timings] +
        [{"stage": "total", "seconds": f"{sum(s for _, s in timings):.1f}"}], ["stage", "seconds"])
    rep.text(f"Subject: {train_cfg.data.instance_dir}; instance prompt '{train_cfg.data.prompt}', class prompt "
             f"'{train_cfg.prior.prompt_for(d.class_noun)}' ({d.num_class_images} class images, λ = "
             f"{train_cfg.prior.prior_weight}); LoRA rank {train_cfg.lora.rank} on UNet and text encoder, "
             f"{d.max_steps} steps; generation with LoRA scales {UNET_SCALE} (UNet) / {TEXT_ENCODER_SCALE} "
             f"(text encoder), {d.steps} sampling steps, seeds {d.seed}..{d.seed + d.num_images - 1}.")
    rep.images("subject photos", [img for _, img in load_folder(train_cfg.data.instance_dir)], real=True)
    class_imgs = sorted(Path(train_cfg.prior.class_dir).glob("*.png"))[:8]
    rep.images("class images (frozen model, class prompt)", [Image.open(p) for p in class_imgs])
    rep.heading("Guidance 7.5 vs 15 (higher guidance: closer to the prompt, less diverse)")
    rep.text("Contact sheets: columns are guidance scales, rows are (UNet, text-encoder) LoRA scales; image i of "
             "every cell uses seed + i, so only the swept value changes between cells.")
    for sheet in sorted(sweep_dir.glob("sheet-*.png")):
        rep.figure(sheet.read_bytes(), f"{sweep_dir.name}/{sheet.name}")
    plot = _loss_plot(out / "lora" / "train_log.csv")
    if plot:
        rep.figure(plot, "training loss (instance + λ·prior)")
    rep.heading("The same on a real model")
    rep.settings({
        "train": "boothkit train --model runwayml/stable-diffusion-v1-5 --instance-dir my_photos --token sks "
                 "--class-noun dog --train-text-encoder --output-dir my_lora --max-steps 800",
        "generate": "boothkit generate --lora my_lora --prompt 'an image of sks dog on the moon' -n 4 "
                    "--guidance 7.5 --unet-scale 0.8 --text-encoder-scale 0.8 --seed 0 --steps 30 --out images",
        "sweep": "boothkit sweep --lora my_lora --prompt 'an image of sks dog on the moon' --guidance 5,7.5,15 "
                 "--unet-scale 0.4,0.8,1 --text-encoder-scale 0,0.8 -n 4 --seed 0 --out sweep --metrics",
        "demo": "boothkit demo --model <hub id or local path> --instance-dir my_photos --class-noun dog",
    }, caption="Commands")
    rep.settings({"outputs": {"lora": str(out / "lora"), "class images": train_cfg.prior.class_dir,
                              "sweep (cells, contact sheets, sweep.csv)": str(sweep_dir)}}, caption="Files")
    return rep.write(out / "index.html")
