"""Generation sweeps: every combination of guidance, UNet LoRA scale and text-encoder LoRA scale, per prompt.

Every cell draws image i from seed + i, so two cells differ only in the swept values. Output (``--out``):

    sweep_config.toml                 the resolved config (a rerun must match its fixed settings)
    cells/p00-<prompt>/g7.5_u0.8_t0/  one folder per cell: 00-s0.png, 01-s1.png, ... with parameters
    sheet-p00-<prompt>.png            labelled contact sheet: columns = guidance, rows = (UNet, TE) scales
    sweep.csv                         one row per image
    metrics.csv, metrics.png          with --metrics: CLIP-T and DIV per cell, DIV against CLIP-T by guidance

A cell is finished when all its PNGs exist (each is written atomically), so an interrupted sweep rerun with
the same flags only generates the missing cells.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from ..core import config as C
from ..core.config import opt
from ..core.errors import BoothkitError, ConfigError, Interrupted
from ..core.files import atomic_write_bytes, file_sha256, slug
from ..core.report import plot_diversity_vs_fidelity
from . import metrics as M
from .metrics import MetricsConfig

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

AXES = ("guidance", "unet_scale", "text_encoder_scale")
# settings that change the pixels of a cell: a rerun into the same --out must keep them
FIXED = ("lora", "model", "model_config", "negative_prompt", "steps", "scheduler", "seed", "width", "height",
         "mixed_precision")


def parse_values(key: str, text: str, minimum: float | None = None) -> tuple[float, ...]:
    """'5,7.5,15' -> (5.0, 7.5, 15.0); a ConfigError names the key on anything else."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"sweep.{key}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise ConfigError(f"sweep.{key}: give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"sweep.{key}: {text!r} repeats a value")
    if minimum is not None and min(values) < minimum:
        raise ConfigError(f"sweep.{key}: {min(values):g} is below the minimum {minimum:g}")
    return values


@dataclass(frozen=True)
class SweepConfig:
    lora: str = opt("", "LoRA as 'PATH[:WEIGHT]': a boothkit output folder or a .safetensors file.", required=True)
    model: Optional[str] = opt(None, "Base model; default: the one named in the LoRA's metadata.")
    model_config: Optional[str] = opt(None, "Local diffusers folder describing a single-file checkpoint.")
    prompt: tuple[str, ...] = opt((), "Prompt (repeatable).", text=True)
    prompts_file: Optional[str] = opt(None, "Text file with one prompt per line (blank lines and #-comments skipped).")
    negative_prompt: str = opt("", "Negative prompt.")
    guidance: str = opt("", "Guidance scales to sweep, comma-separated (e.g. 5,7.5,15); default: the model family's "
                            "(7.5 SD/SDXL, 7 SD3, 3.5 FLUX.1), from the LoRA's metadata.")
    unet_scale: str = opt(f"{C.LORA_SCALE:g}", "UNet LoRA scales to sweep, comma-separated (e.g. 0.4,0.8,1).")
    text_encoder_scale: str = opt(f"{C.LORA_SCALE:g}", "Text-encoder LoRA scales to sweep, comma-separated (e.g. 0,0.8).")
    num_images: int = opt(4, "Images per cell (image i uses seed + i in every cell).", short="-n", min=1)
    steps: int = opt(30, "Sampling steps.", min=1)
    scheduler: Optional[str] = opt(None, "Sampler; default: the model folder's own scheduler.", choices=C.SCHEDULERS)
    seed: int = opt(0, "Image i of every cell uses torch.Generator('cpu').manual_seed(seed + i).")
    width: int = opt(0, "Width in pixels, a multiple of 8 (0: the model's native size).", min=0)
    height: int = opt(0, "Height in pixels, a multiple of 8 (0: the model's native size).", min=0)
    batch_size: int = opt(1, "Images per forward pass.", min=1)
    mixed_precision: str = opt("auto", "Run the pipeline in this precision (auto: what the hardware does best).",
                               choices=C.MIXED_PRECISION)
    metrics: bool = opt(False, "Measure CLIP-T and DIV per cell and plot diversity against prompt fidelity.")
    out: str = opt("", "Output folder.", required=True)

    def validate(self) -> None:
        if not self.prompt and not self.prompts_file:
            raise ConfigError("sweep.prompt is required (--prompt or --prompts-file)")
        self.axes()

    def axes(self) -> dict[str, tuple[float, ...]]:
        # an empty guidance is the family's, filled in by run_sweep once the LoRA is read
        return {"guidance": parse_values("guidance", self.guidance, 0.0) if self.guidance else (),
                "unet_scale": parse_values("unet_scale", self.unet_scale),
                "text_encoder_scale": parse_values("text_encoder_scale", self.text_encoder_scale)}


# sweep + the evaluator settings (CLIP model, LPIPS net, ...) that --metrics uses
SWEEP_SECTIONS: dict[str, type] = {"sweep": SweepConfig, "metrics": MetricsConfig}


class Cell(NamedTuple):
    prompt_index: int
    guidance: float
    unet_scale: float
    text_encoder_scale: float


# --------------------------------------------------------------------------------------------- layout

def load_prompts(s: SweepConfig) -> list[str]:
    """--prompt values, then the lines of --prompts-file."""
    prompts = list(s.prompt)
    if s.prompts_file:
        try:
            lines = Path(s.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--prompts-file {s.prompts_file}: cannot read ({exc.__class__.__name__})") from None
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts-file {s.prompts_file}: no prompts in it")
    return prompts


def cells_of(prompts: Sequence[str], axes: dict[str, tuple[float, ...]]) -> list[Cell]:
    """Every combination, prompt-major, in the order the axes were given."""
    return [Cell(p, *combo) for p in range(len(prompts)) for combo in itertools.product(*axes.values())]


def prompt_dir(out: Path, index: int, prompt: str) -> Path:
    return out / "cells" / f"p{index:02d}-{slug(prompt)}"


def cell_dir(out: Path, cell: Cell, prompt: str) -> Path:
    return prompt_dir(out, cell.prompt_index, prompt) / (
        f"g{cell.guidance:g}_u{cell.unet_scale:g}_t{cell.text_encoder_scale:g}")


def image_paths(out: Path, cell: Cell, prompt: str, n: int, seed: int) -> list[Path]:
    folder = cell_dir(out, cell, prompt)
    return [folder / f"{i:02d}-s{seed + i}.png" for i in range(n)]


def is_finished(paths: Sequence[Path]) -> bool:
    return all(p.is_file() for p in paths)


def check_same_sweep(out: Path, s: SweepConfig, lora_sha256: str) -> None:
    """Refuse to mix cells made with other fixed settings, or another LoRA file at the same path, into one folder."""
    path = out / "sweep_config.toml"
    if not path.is_file():
        return
    old = C.load_toml(path).get("sweep", {})
    for key in FIXED:
        if old.get(key) != getattr(s, key):
            raise BoothkitError(f"--out {out} holds a sweep made with {key} = {old.get(key)!r} (now "
                                f"{getattr(s, key)!r}); use another --out or the same settings")
    stamp = out / "lora.sha256"
    if stamp.is_file() and stamp.read_text().strip() != lora_sha256:
        raise BoothkitError(f"--out {out} holds a sweep of an earlier version of --lora {s.lora} (the file changed "
                            f"since); use another --out")


# ------------------------------------------------------------------------------------------- sheets

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(cells: Sequence[Sequence], col_labels: Sequence[str], row_labels: Sequence[str], title: str):
    """Grid of cell images (rows x cols, equal sizes) under a title, with column headers and row labels.

    The label bands are on the top and the left, so cell (r, c) sits at (L + c * w, T + r * h).
    """
    from PIL import Image, ImageDraw

    w, h = cells[0][0].size
    size = max(10, min(40, h // 10))
    font, pad = _font(size), max(2, size // 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda t: int(math.ceil(probe.textlength(t, font=font)))  # noqa: E731
    left = max(text_w(line) for label in row_labels for line in label.split("\n")) + 2 * pad
    top = 2 * (size + 2 * pad)
    sheet = Image.new("RGB", (left + len(col_labels) * w, top + len(row_labels) * h), "white")
    draw = ImageDraw.Draw(sheet)
    while text_w(title) > sheet.width - 2 * pad and len(title) > 4:
        title = title[:-4] + "..."
    draw.text((pad, pad), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + pad, size + 3 * pad), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.multiline_text((pad, top + r * h + pad), label, fill="black", font=font, spacing=pad)
        for c, img in enumerate(cells[r]):
            sheet.paste(img.convert("RGB"), (left + c * w, top + r * h))
    return sheet


def cell_image(images: Sequence):
    """A cell's images as one near-square grid."""
    from ..generate.generation import make_grid

    return make_grid(images, math.ceil(math.sqrt(len(images))))


def write_sheet(out: Path, s: SweepConfig, p: int, prompt: str, axes: dict[str, tuple[float, ...]]) -> Path:
    """The contact sheet of one prompt, built from the PNGs on disk."""
    from ..generate.generation import save_png
    from ..train.data import load_image

    rows = list(itertools.product(axes["unet_scale"], axes["text_encoder_scale"]))
    grid = []
    for u, t in rows:
        row = []
        for g in axes["guidance"]:
            paths = image_paths(out, Cell(p, g, u, t), prompt, s.num_images, s.seed)
            row.append(cell_image([load_image(x) for x in paths]))
        grid.append(row)
    sheet = contact_sheet(grid, [f"CFG {g:g}" for g in axes["guidance"]],
                          [f"UNet {u:g}\nTE {t:g}" for u, t in rows],
                          f"{prompt}  (seeds {s.seed}..{s.seed + s.num_images - 1})")
    return save_png(sheet, out / f"sheet-p{p:02d}-{slug(prompt)}.png", sheet_parameters(out, s, p, prompt, axes))


def sheet_parameters(out: Path, s: SweepConfig, p: int, prompt: str, axes: dict[str, tuple[float, ...]]) -> str:
    """A contact sheet's parameters: its first cell's (model, sampler, steps, size, precision...), with the axes in
    place of the one guidance and scale and every cell's seeds."""
    from PIL import Image

    from ..generate.generation import parse_parameters, render_parameters, seed_list

    first = image_paths(out, Cell(p, axes["guidance"][0], axes["unet_scale"][0], axes["text_encoder_scale"][0]),
                        prompt, s.num_images, s.seed)[0]
    with Image.open(first) as im:
        params = parse_parameters(im.text.get("parameters", f"{prompt}\n"))
    params.pop("Seed", None)
    params.update({"CFG scale": "columns " + " ".join(f"{g:g}" for g in axes["guidance"]),
                   "UNet scale": "rows " + " ".join(f"{u:g}" for u in axes["unet_scale"]),
                   "TE scale": "each UNet scale with " + " ".join(f"{t:g}" for t in axes["text_encoder_scale"]),
                   "Seeds": f"{seed_list(range(s.seed, s.seed + s.num_images))} in every cell"})
    return render_parameters(params)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


# ----------------------------------------------------------------------------------------- generation

def generate_cells(out: Path, s: SweepConfig, prompts: Sequence[str], todo: Sequence[Cell], total: int,
                   stop: threading.Event | None = None) -> None:
    """Generate the unfinished cells with one pipeline; the progress bar counts every image of the sweep. `stop`
    (the UI's Stop) ends it between cells; the cells made are kept and a rerun makes only the others."""
    from ..core.precision import default_device
    from ..generate import generation as G

    loras = [G.parse_lora_spec(s.lora)]
    with G.progress_bar("sweep", total) as advance:
        advance(total - len(todo) * s.num_images)
        if not todo:
            return
        dtype = G.precision_dtype(s.mixed_precision, default_device())
        pipe = G.load_generation_pipeline(s.model, loras, model_config=s.model_config, scheduler=s.scheduler,
                                          dtype=dtype)
        G.warn_long_prompts(pipe, {"--prompt": prompts, "--negative-prompt": [s.negative_prompt]})
        width, height = G.image_size(pipe, s.width, s.height)
        sampler = G.sampler_label(pipe.scheduler)
        for n, cell in enumerate(todo):
            if stop is not None and stop.is_set():
                raise Interrupted(f"interrupted after {n} of {len(todo)} cells; they are kept in {out}: run the same "
                                  f"sweep again to finish it")
            prompt = prompts[cell.prompt_index]
            G.set_lora_scales(pipe, cell.unet_scale, cell.text_encoder_scale)
            images = G.generate_images(pipe, prompt, num_images=s.num_images, seed=s.seed, steps=s.steps,
                                       guidance=cell.guidance, negative_prompt=s.negative_prompt, width=width,
                                       height=height, batch_size=s.batch_size)
            for i, (img, path) in enumerate(zip(images, image_paths(out, cell, prompt, s.num_images, s.seed))):
                text = G.parameters_text(prompt, s.negative_prompt, steps=s.steps, sampler=sampler,
                                         guidance=cell.guidance, seed=s.seed + i, width=width, height=height,
                                         **G.pipeline_fields(pipe), loras=loras,
                                         unet_scale=cell.unet_scale, text_encoder_scale=cell.text_encoder_scale)
                G.save_png(img, path, text)
            advance(s.num_images)


def family_guidance(lora: str) -> float:
    """The default guidance of the family a boothkit LoRA was trained for (SD's 7.5 for other LoRAs)."""
    from ..adapters.lora import read_lora_info
    from ..models.families import SD, by_name

    name = read_lora_info(lora).get("family")
    return (by_name(name) if name else SD).default_guidance


def run_sweep(cfg: C.RunConfig, stop: threading.Event | None = None) -> Path:
    """`boothkit sweep`: generate every unfinished cell, then the contact sheets, sweep.csv and (--metrics) metrics."""
    from ..adapters.lora import lora_header
    from ..core.precision import default_device, resolve
    from ..generate.generation import parse_lora_spec

    if cfg.sweep.mixed_precision == "fp16" and default_device() == "cpu":
        raise ConfigError("--mixed-precision fp16 needs a GPU; on CPU use bf16 or no")
    # resolved before it is saved and compared: cells made in another precision are other pixels
    cfg = cfg.replace("sweep", mixed_precision=resolve(cfg.sweep.mixed_precision, default_device()))
    if not cfg.sweep.guidance:  # the family's own, named in the saved config (a rerun compares it)
        cfg = cfg.replace("sweep", guidance=f"{family_guidance(parse_lora_spec(cfg.sweep.lora)[0]):g}")
    s = cfg.sweep
    out = C.check_output(s.out, "--out")
    prompts, axes = load_prompts(s), s.axes()
    # the evaluators load before any sampling: a device this machine lacks, LPIPS weights never imported or a CLIP
    # model that cannot be loaded fail now, not after the whole sweep
    judges = sweep_judges(cfg.metrics) if s.metrics else None
    digest = file_sha256(lora_header(parse_lora_spec(s.lora)[0])[0])  # a wrong or damaged file fails now
    check_same_sweep(out, s, digest)
    out.mkdir(parents=True, exist_ok=True)
    C.save_toml(out / "sweep_config.toml", cfg.to_dict())
    atomic_write_bytes(out / "lora.sha256", (digest + "\n").encode())
    cells = cells_of(prompts, axes)
    todo = [c for c in cells if not is_finished(image_paths(out, c, prompts[c.prompt_index], s.num_images, s.seed))]
    generate_cells(out, s, prompts, todo, len(cells) * s.num_images, stop)
    for p, prompt in enumerate(prompts):
        write_sheet(out, s, p, prompt, axes)
    rows = [[c.prompt_index, prompts[c.prompt_index], f"{c.guidance:g}", f"{c.unet_scale:g}",
             f"{c.text_encoder_scale:g}", i, s.seed + i, path.relative_to(out).as_posix()]
            for c in cells for i, path in enumerate(image_paths(out, c, prompts[c.prompt_index], s.num_images, s.seed))]
    write_csv(out / "sweep.csv", ("prompt_index", "prompt", "guidance", "unet_scale", "text_encoder_scale", "image",
                                  "seed", "file"), rows)
    if judges is not None:
        write_metrics(out, s, cfg.metrics, prompts, cells, judges)
    return out


# -------------------------------------------------------------------------------------------- metrics

def sweep_judges(mcfg) -> tuple[Any, Any]:
    """(LPIPS, CLIP evaluator) of --metrics, on the metrics device."""
    from ..core.precision import pick_device

    device = pick_device(mcfg.device)
    lpips = M.load_lpips(mcfg.lpips_net, device)  # first: the cheapest error (weights not imported)
    return lpips, M.ClipEvaluator(mcfg.clip_model, device, mcfg.eval_batch_size)


def cell_metrics(images_by_cell: Sequence[Sequence], prompts_by_cell: Sequence[str], mcfg,
                 judges: tuple[Any, Any]) -> list[dict[str, Any]]:
    """CLIP-T (image-prompt cosine, averaged) and DIV (mean pairwise LPIPS; None for one image) of every cell."""
    lpips, clip = judges
    unique = list(dict.fromkeys(prompts_by_cell))
    text = clip.text_embeds(unique)
    rows = []
    for images, prompt in zip(images_by_cell, prompts_by_cell):
        emb = clip.image_embeds(images)
        clip_t = M.rowwise_cosine(emb, text[unique.index(prompt)].expand_as(emb)).mean()
        div = M.mean_pairwise_lpips(lpips, images, mcfg.lpips_size, mcfg.eval_batch_size) if len(images) > 1 else None
        rows.append({"CLIP-T": float(clip_t), "DIV": div, "meaningful": clip.meaningful})
    return rows


def write_metrics(out: Path, s: SweepConfig, mcfg, prompts: Sequence[str], cells: Sequence[Cell],
                  judges: tuple[Any, Any]) -> Path:
    """metrics.csv (one row per cell) and metrics.png: DIV against CLIP-T, one series per guidance value."""
    from ..train.data import load_image

    images = [[load_image(p) for p in image_paths(out, c, prompts[c.prompt_index], s.num_images, s.seed)]
              for c in cells]
    values = cell_metrics(images, [prompts[c.prompt_index] for c in cells], mcfg, judges)
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    write_csv(out / "metrics.csv", ("prompt_index", "prompt", "guidance", "unet_scale", "text_encoder_scale",
                                    "CLIP-T", "DIV"),
              [[c.prompt_index, prompts[c.prompt_index], f"{c.guidance:g}", f"{c.unet_scale:g}",
                f"{c.text_encoder_scale:g}", fmt(v["CLIP-T"]), fmt(v["DIV"])] for c, v in zip(cells, values)])
    note = "" if all(v["meaningful"] for v in values) else M.TINY_NOTE
    return plot_metrics(out / "metrics.png", cells, values, note)


def plot_metrics(path: Path, cells: Sequence[Cell], values: Sequence[dict], note: str = "") -> Path:
    """Diversity vs prompt fidelity: one line per (UNet, TE) scale pair through its guidance values, each point
    averaged over the prompts: the seed experiment's "higher guidance, closer to the prompt, less diverse"."""
    groups: dict[tuple[float, float, float], list[dict]] = {}
    for c, v in zip(cells, values):
        groups.setdefault((c.guidance, c.unet_scale, c.text_encoder_scale), []).append(v)
    rows = []
    for (g, u, t), vs in groups.items():
        divs = [v["DIV"] for v in vs if v["DIV"] is not None]
        rows.append({"guidance": g, "label": f"UNet {u:g} / TE {t:g}",
                     "CLIP-T": sum(v["CLIP-T"] for v in vs) / len(vs), "DIV": sum(divs) / len(divs) if divs else None})
    atomic_write_bytes(path, plot_diversity_vs_fidelity(rows, note=note))
    return path
