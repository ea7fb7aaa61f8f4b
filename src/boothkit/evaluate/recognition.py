"""Does `mini` draw its world? `boothkit bench mini`: samples for the most frequent nouns, judged twice.

Judges: the nearest real emoji by `mini`'s CLIP image tower, and by real pretrained LPIPS (independent of
anything trained here). The reference set ships with the weights (assets/mini/reference.npz: the frequent
nouns' emoji in both training styles, on white), so the check needs no npm. Two-object captions are judged
on the picture's halves. Chance is 1 / number of reference names.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.config import opt
from ..core.files import atomic_write_bytes
from ..core.progress import progress_bar
from ..core.report import Report
from ..mini.scenes import with_article
from ..mini.subjects import SUBJECTS, dataset_dir
from ..models.mini import mini_dir
from .metrics import ClipEvaluator, DinoEvaluator, load_lpips, lpips_tensor, unit_rows

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

PAIR_SUBJECTS = ("girl", "boy", "dog", "cat", "teddy bear")
PAIR_PROPS = ("soft ice cream", "full moon symbol", "classical building")


@dataclass(frozen=True)
class MiniBenchConfig:
    out: str = opt("mini-bench", "Output folder (report.html, results.json, grid.png).")
    model: str = opt("mini", "Model to judge: 'mini', 'mini-flow', or a diffusers folder trained on the emoji world.")
    nouns: int = opt(50, "How many of the most frequent nouns to sample.", min=1)
    seeds: int = opt(4, "Samples per caption (seeds 0..N-1).", min=1)
    steps: int = opt(25, "Sampling steps (the model's own sampler: DDIM on mini, flow Euler on mini-flow).", min=1)
    guidance: Optional[float] = opt(None, "Classifier-free guidance scale; default: the model's own (7.5 mini, "
                                          "5 mini-flow, which draws with true CFG).", min=0.0)
    lpips_net: str = opt("alex", "LPIPS trunk of the independent judge.", choices=("alex", "vgg"))


MINI_BENCH_SECTIONS = {"bench": MiniBenchConfig}


def reference(names: Sequence[str] | None = None):
    """(names, styles, RGB images on white) of the shipped reference emoji, optionally only `names`."""
    import numpy as np


    with np.load(mini_dir() / "reference.npz") as z:
        rows = [(str(n), str(s), im) for n, s, im in zip(z["names"], z["styles"], z["images"])]
    if names is not None:
        rows = [r for r in rows if r[0] in set(names)]
    return [r[0] for r in rows], [r[1] for r in rows], np.stack([on_white(r[2]) for r in rows])


def on_white(rgba):
    import numpy as np

    a = rgba[..., 3:].astype(np.float32) / 255
    return np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)


def frequent_names() -> list[str]:
    """The reference's names, most frequent first (the order the ship stage counted them in)."""
    return json.loads((mini_dir() / "reference.json").read_text())["frequent"]


def sample(pipe, prompts: Sequence[str], seeds: int, steps: int, guidance: float, progress=None) -> list:
    """`seeds` PIL samples per prompt, seed s for the s-th (boothkit.generate.generation's seeding: the same on every run)."""
    from ..generate.generation import generate_images  # imports torch: the CLI's --help imports this module

    out = []
    for prompt in prompts:
        out += generate_images(pipe, prompt, num_images=seeds, seed=0, steps=steps, guidance=guidance,
                               batch_size=seeds)
        if progress:
            progress()
    return out


def nearest_by_clip(clip, images: Sequence, ref_images: Sequence = (), ref_emb=None) -> "Any":
    """Reference indices ordered by cosine of CLIP image embeddings, for each image; pass `ref_emb` (unit rows)
    to reuse the references' embeddings."""
    if ref_emb is None:
        ref_emb = unit_rows(clip.image_embeds(list(ref_images)).double())
    return (unit_rows(clip.image_embeds(list(images)).double()) @ ref_emb.T).argsort(dim=1, descending=True)


def names_in_halves(clip, images: Sequence, ref_emb, ref_names: Sequence[str], k: int = 3) -> list[tuple[set, set]]:
    """For each picture, the names of CLIP's k nearest references of its left half and of its right half."""
    order = nearest_by_clip(clip, [h for img in images for h in halves(img)], ref_emb=ref_emb)[:, :k].tolist()
    names = [{ref_names[j] for j in row} for row in order]
    return list(zip(names[0::2], names[1::2]))


def nearest_by_lpips(lpips, images: Sequence, ref_images: Sequence, size: int = 64) -> "Any":
    """Reference indices ordered by LPIPS distance, for each image."""
    import torch


    x = torch.stack([lpips_tensor(im, size) for im in images])
    r = torch.stack([lpips_tensor(im, size) for im in ref_images])
    rows = []
    with torch.inference_mode():
        for xi in x:
            rows.append(lpips(xi.expand_as(r), r).flatten())
    return torch.stack(rows).argsort(dim=1)


def halves(img):
    """Left and right halves of a picture, each padded back to a square on white."""
    from PIL import Image

    w, h = img.size
    out = []
    for box in ((0, 0, w // 2, h), (w // 2, 0, w, h)):
        canvas = Image.new("RGB", (w // 2, w // 2) if h <= w // 2 else (h, h), "white")
        part = img.crop(box)
        canvas.paste(part, ((canvas.width - part.width) // 2, (canvas.height - part.height) // 2))
        out.append(canvas.resize((w, h)))
    return out


def recognition(order, sample_names: Sequence[str], ref_names: Sequence[str], k: int = 1) -> float:
    """Share of samples whose top-k nearest references include one of the right name."""
    hits = [any(ref_names[j] == want for j in row[:k].tolist()) for row, want in zip(order, sample_names)]
    return sum(hits) / max(1, len(hits))


WORLD_NAME = {"backpack": "school satchel", "full moon": "full moon symbol"}  # Fluent name -> emoji.json name


def heldout_photos():
    """(subject, world name of its emoji, PIL photo) of every held-out Fluent subject picture that ships."""
    from PIL import Image


    return [(subject, WORLD_NAME.get(name, name), Image.open(p).convert("RGB"))
            for subject, (name, _) in SUBJECTS.items() for p in sorted((dataset_dir() / subject).glob("*.png"))]


def evaluator_checks(clip, dino) -> dict[str, float]:
    """The evaluators on a style they never saw (Fluent UI subjects):
    - names: CLIP's nearest reference emoji (Noto/Twemoji) has the subject's name (top-1, top-5);
    - instances: the nearest other picture, among all subjects' photos and the same-name Noto/Twemoji emoji,
      is a photo of the same subject: DINO should beat CLIP-I here, as DINO does on the paper's benchmark."""
    import torch
    from PIL import Image


    ref_names, _, ref_arrays = reference()
    refs = [Image.fromarray(a) for a in ref_arrays]
    photos = heldout_photos()
    known = [(s, n, im) for s, n, im in photos if n in ref_names]
    order = nearest_by_clip(clip, [im for _, _, im in known], refs)
    out = {"subjects": len({s for s, _, _ in photos}), "photos": len(photos), "reference names": len(set(ref_names)),
           "name chance": 1 / len(set(ref_names)),
           "CLIP names top-1": recognition(order, [n for _, n, _ in known], ref_names),
           "CLIP names top-5": recognition(order, [n for _, n, _ in known], ref_names, 5)}
    same_name = [(n, im) for n, im in zip(ref_names, refs) if n in {n for _, n, _ in photos}]
    gallery = [im for _, _, im in photos] + [im for _, im in same_name]
    owner = [s for s, _, _ in photos] + [f"reference:{n}" for n, _ in same_name]
    for label, model in (("DINO", dino), ("CLIP-I", clip)):
        emb = unit_rows(model.image_embeds(gallery).double())
        sim = emb[: len(photos)] @ emb.T
        sim[torch.arange(len(photos)), torch.arange(len(photos))] = -2.0  # not itself
        best = sim.argmax(dim=1).tolist()
        out[f"{label} instance top-1"] = sum(owner[j] == owner[i] for i, j in enumerate(best)) / len(photos)
    out["instance chance"] = (len(photos) // out["subjects"] - 1) / (len(gallery) - 1)
    return out


def run_mini_bench(cfg) -> Path:
    from PIL import Image

    from ..generate.generation import parameters_text, pipeline_fields, sampler_label, save_png
    from ..models.families import family_of
    from ..models.loading import load_pipeline

    b: MiniBenchConfig = cfg.bench
    out = Path(b.out)
    out.mkdir(parents=True, exist_ok=True)
    names = frequent_names()[: b.nouns]
    ref_names, ref_styles, ref_arrays = reference(frequent_names())
    ref_images = [Image.fromarray(a) for a in ref_arrays]
    pipe = load_pipeline(b.model)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    guidance = family.guidance_of(pipe) if b.guidance is None else b.guidance

    prompts = [f"an emoji of {with_article(n)}" for n in names]
    pairs = [(s, p) for s in PAIR_SUBJECTS for p in PAIR_PROPS if s in ref_names and p in ref_names]
    pair_prompts = [f"an emoji of {with_article(s)} next to {with_article(p)}" for s, p in pairs]
    with progress_bar(f"sampling {b.model}", len(prompts) + len(pair_prompts)) as advance:
        images = sample(pipe, prompts, b.seeds, b.steps, guidance, advance)
        pair_images = sample(pipe, pair_prompts, b.seeds, b.steps, guidance, advance)
    want = [n for n in names for _ in range(b.seeds)]
    clip = ClipEvaluator("mini", pipe.device)
    lpips = load_lpips(b.lpips_net)
    by_clip = nearest_by_clip(clip, images, ref_images)
    by_lpips = nearest_by_lpips(lpips, images, ref_images)
    chance = 1 / len(set(ref_names))
    single = {"samples": len(images), "reference names": len(set(ref_names)), "chance": chance,
              "CLIP top-1": recognition(by_clip, want, ref_names), "CLIP top-5": recognition(by_clip, want, ref_names, 5),
              "LPIPS top-1": recognition(by_lpips, want, ref_names),
              "LPIPS top-5": recognition(by_lpips, want, ref_names, 5)}
    # two objects: each must be among the 3 nearest references of one half, the other object of the other half

    ref_emb = unit_rows(clip.image_embeds(ref_images).double())
    both = []
    for i, (left, right) in enumerate(names_in_halves(clip, pair_images, ref_emb, ref_names)):
        subject, prop = pairs[i // b.seeds]
        both.append((subject in left and prop in right) or (subject in right and prop in left))
    two = {"samples": len(pair_images), "both objects (CLIP, top-3 per half)": sum(both) / max(1, len(both))}

    checks = evaluator_checks(clip, DinoEvaluator("mini", pipe.device))
    grid = sample_grid(images[: 12 * b.seeds], names[:12], b.seeds, ref_names, ref_styles, ref_images)
    sheet = functools.partial(parameters_text, negative_prompt="", steps=b.steps, guidance=guidance,
                              sampler=sampler_label(pipe.scheduler), seed=list(range(b.seeds)),
                              width=images[0].width, height=images[0].height, loras=[],
                              **{**pipeline_fields(pipe), "model": b.model})
    save_png(grid, out / "grid.png", sheet("\n".join(prompts[:12])))  # one row per prompt
    pair_grid = sample_grid(pair_images, [f"{s} + {p}" for s, p in pairs], b.seeds, [], [], [])
    save_png(pair_grid, out / "pairs.png", sheet("\n".join(pair_prompts)))
    result = {"settings": {"model": b.model, "nouns": names, "seeds": b.seeds, "steps": b.steps,
                           "guidance": guidance, "sampler": type(pipe.scheduler).__name__, "lpips": b.lpips_net},
              "single": single, "two_objects": two, "pairs": [list(p) for p in pairs], "evaluators": checks}
    atomic_write_bytes(out / "results.json", json.dumps(result, indent=2).encode())
    rep = Report(f"{b.model}: does it draw its world?")
    rep.table([{"judge": k, "value": v} for k, v in single.items()], ["judge", "value"], "single-object captions")
    rep.table([{"judge": k, "value": v} for k, v in two.items()], ["judge", "value"], "two-object captions")
    rep.table([{"check": k, "value": v} for k, v in checks.items()], ["check", "value"],
              "the evaluators on the held-out Fluent UI style")
    rep.figure((out / "grid.png").read_bytes(), "samples (4 seeds) and the real emoji (google, twitter) per row")
    rep.figure((out / "pairs.png").read_bytes(), "two-object captions")
    rep.settings(result["settings"])
    rep.write(out / "report.html")
    return out


def sample_grid(images: Sequence, labels: Sequence[str], per_row: int, ref_names, ref_styles, ref_images,
                cell: int = 64):
    """Rows of samples (one row per label) followed by that label's real emoji, with the label at the left."""
    from PIL import Image, ImageDraw

    label_w = 150
    refs = {n: [im for rn, im in zip(ref_names, ref_images) if rn == n] for n in labels}
    width = label_w + cell * (per_row + max([len(v) for v in refs.values()] + [0]) + 1)
    grid = Image.new("RGB", (width, cell * len(labels)), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        draw.text((4, r * cell + cell // 2 - 6), label[:24], fill="black")
        for c in range(per_row):
            grid.paste(images[r * per_row + c].resize((cell, cell)), (label_w + c * cell, r * cell))
        for c, im in enumerate(refs.get(label, [])):
            grid.paste(im.resize((cell, cell)), (label_w + (per_row + 1 + c) * cell, r * cell))
    return grid
