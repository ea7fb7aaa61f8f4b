"""The seed experiment, measured on a sweep folder: is the subject learned, are the scenes drawn, and what does
guidance trade? Every measure comes from two judges where it can: `mini`'s evaluators and real LPIPS.

Per sweep cell (prompt x guidance x UNet scale x text-encoder scale): DINO and CLIP-I against the subject's
photos, CLIP-T against the prompt, the share of pictures whose scene prop is there (the prop must be among
CLIP's 3 nearest reference emoji of the picture's left or right half), DIV (mean pairwise LPIPS), and for the
class prompt PRES (DINO of class samples to the subject: lower means the class kept its own look).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..core.files import atomic_write_bytes
from ..core.report import figure_png
from . import metrics as M
from .recognition import names_in_halves, reference
from .sweep import cells_of, image_paths

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

MEASURES = ("DINO", "CLIP-I", "CLIP-T", "prop", "DIV")


def measure_cells(sweep_dir: Path, s, prompts: Sequence[str], props: Mapping[str, str], photos: Sequence,
                  class_prompt: Optional[str], mcfg) -> list[dict[str, Any]]:
    """One row per cell of the sweep in `sweep_dir` (config `s`); `props` maps scene prompts to their prop name."""
    from PIL import Image

    from ..core.precision import pick_device
    from ..train.data import load_image

    device = pick_device(mcfg.device)
    lpips = M.load_lpips(mcfg.lpips_net, device)
    clip = M.ClipEvaluator(mcfg.clip_model, device, mcfg.eval_batch_size)
    dino = M.DinoEvaluator(mcfg.dino_model, device, mcfg.eval_batch_size)
    ref_names, _, ref_arrays = reference()
    refs = [Image.fromarray(a) for a in ref_arrays]
    ref_emb = M.unit_rows(clip.image_embeds(refs).double())
    dino_real, clip_real = dino.image_embeds(photos), clip.image_embeds(photos)
    text = clip.text_embeds(list(prompts))
    rows = []
    for cell in cells_of(prompts, s.axes()):
        prompt = prompts[cell.prompt_index]
        images = [load_image(p) for p in image_paths(sweep_dir, cell, prompt, s.num_images, s.seed)]
        d, c = dino.image_embeds(images), clip.image_embeds(images)
        row = {"prompt": prompt, "guidance": cell.guidance, "unet_scale": cell.unet_scale,
               "text_encoder_scale": cell.text_encoder_scale, "class": prompt == class_prompt,
               "DINO": M.mean_pairwise_cosine(d, dino_real), "CLIP-I": M.mean_pairwise_cosine(c, clip_real),
               "CLIP-T": float(M.rowwise_cosine(c, text[cell.prompt_index].expand_as(c)).mean()),
               "DIV": M.mean_pairwise_lpips(lpips, images, mcfg.lpips_size, mcfg.eval_batch_size)
               if len(images) > 1 else None, "prop": None}
        if prompt in props:
            found = [props[prompt] in left | right for left, right in names_in_halves(clip, images, ref_emb, ref_names)]
            row["prop"] = sum(found) / len(found)
        rows.append(row)
    return rows


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(rows: Sequence[Mapping[str, Any]], guidances: Sequence[float], scales: Sequence[tuple[float, float]]
              ) -> list[dict[str, Any]]:
    """Scene prompts averaged per (guidance, scales), with PRES and class DIV from the class prompt's cells."""
    out = []
    for u, t in scales:
        for g in guidances:
            mine = [r for r in rows if r["guidance"] == g and (r["unet_scale"], r["text_encoder_scale"]) == (u, t)]
            scenes = [r for r in mine if r["prop"] is not None]
            cls = [r for r in mine if r["class"]]
            row = {"LoRA (UNet / TE)": f"{u:g} / {t:g}", "guidance": g}
            row.update({m: _mean(r[m] for r in scenes) for m in MEASURES})
            row["PRES"] = _mean(r["DINO"] for r in cls)
            row["class DIV"] = _mean(r["DIV"] for r in cls)
            out.append(row)
    return out


def reading(table: Sequence[Mapping[str, Any]], low: float, high: float, after: str) -> str:
    """Plain words on what the numbers say about the seed's conclusion, whichever way they fall."""
    a = next(r for r in table if r["guidance"] == low and r["LoRA (UNet / TE)"] == after)
    b = next(r for r in table if r["guidance"] == high and r["LoRA (UNet / TE)"] == after)
    base = next((r for r in table if r["guidance"] == low and r["LoRA (UNet / TE)"] == "0 / 0"), None)

    def move(key: str, name: str = "") -> str:
        name = name or key
        if a[key] is None or b[key] is None:
            return f"{name} was not measured"
        if abs(b[key] - a[key]) < 5e-4:
            return f"{name} stayed at {a[key]:.3f}"
        return f"{name} {'rose' if b[key] > a[key] else 'fell'} from {a[key]:.3f} to {b[key]:.3f}"

    fidelity_up = (b["CLIP-T"] or 0) > (a["CLIP-T"] or 0) or (b["prop"] or 0) > (a["prop"] or 0)
    diversity_down = (b["DIV"] or 0) < (a["DIV"] or 0)
    verdict = ("The seed's conclusion holds here: higher guidance followed the prompt more closely and gave less "
               "varied pictures." if fidelity_up and diversity_down else
               "The seed's conclusion does not fully hold here: " +
               ("prompt fidelity did not rise" if not fidelity_up else "diversity did not fall") + ".")
    text = (f"With the LoRA at {after} (UNet / text encoder), going from guidance {low:g} to {high:g}: "
            f"{move('CLIP-T')}, {move('prop', 'the share of pictures showing the scene object')}, "
            f"{move('DIV')} (LPIPS diversity), and subject fidelity {move('DINO')}. {verdict}")
    if base is not None and a["DINO"] is not None and base["DINO"] is not None:
        text += (f" Against the base model at guidance {low:g} (LoRA off), subject fidelity (DINO) went from "
                 f"{base['DINO']:.3f} to {a['DINO']:.3f}: " +
                 ("the subject was learned." if a["DINO"] > base["DINO"] else "no sign that the subject was learned."))
    return text


def plot_guidance(rows: Sequence[Mapping[str, Any]], scales: tuple[float, float]) -> bytes:
    """PNG: prompt fidelity (CLIP-T, prop share), diversity (DIV) and subject fidelity (DINO) against guidance."""
    from matplotlib.figure import Figure


    table = summarise(rows, sorted({r["guidance"] for r in rows}), [scales])
    fig = Figure(figsize=(10, 3))
    for k, (key, label) in enumerate((("CLIP-T", "prompt fidelity: CLIP-T"), ("prop", "prompt fidelity: prop found"),
                                      ("DIV", "diversity: LPIPS"), ("DINO", "subject fidelity: DINO"))):
        ax = fig.add_subplot(1, 4, k + 1)
        pts = [(r["guidance"], r[key]) for r in table if r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("guidance")
        ax.grid(alpha=0.3)
    fig.suptitle(f"scene prompts, LoRA {scales[0]:g} / {scales[1]:g}", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """rows as CSV, written atomically."""
    import io


    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows([{k: f"{v:.6g}" if isinstance(v, float) else "" if v is None else v for k, v in r.items()} for r in rows])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path
