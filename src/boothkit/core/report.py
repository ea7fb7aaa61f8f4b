"""Self-contained HTML reports: metric tables, image grids (base64 thumbnails), plots and the exact settings.

One file per evaluation or benchmark, readable offline and attachable to an issue. Plots use matplotlib's
object API (no pyplot, no global backend switch) and are imported only when a plot is drawn.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .files import atomic_write_bytes

METRIC_COLUMNS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.notice{background:#fff3cd;border:1px solid #e0c060;padding:.8em;margin:1em 0;font-weight:bold}
.row{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start;margin:.3em 0 1em}
.row img{width:128px;height:128px;object-fit:cover;border:1px solid #ddd}
.real img{border:2px solid #2a7}.label{font-size:.9em;margin-top:.8em}pre{background:#f7f7f7;padding:1em;overflow:auto}pre.code{white-space:pre-wrap}
"""


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def image_data_uri(img, size: int = 128, quality: int = 85) -> str:
    """A PIL image as a JPEG data URI, shrunk so its longer side is at most `size`."""
    thumb = img.convert("RGB").copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def figure_png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes, drawn on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_metric_distributions(per_prompt: Sequence[Mapping[str, Any]],
                              metrics: Sequence[str] = ("DINO", "CLIP-I", "CLIP-T", "DIV")) -> bytes:
    """PNG: for each metric, the spread of its per-prompt values (box plot with every prompt as a dot)."""
    from matplotlib.figure import Figure

    shown = [m for m in metrics if any(r.get(m) is not None for r in per_prompt)]
    fig = Figure(figsize=(2.2 * max(len(shown), 1) + 1, 3.2))
    for k, metric in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), k + 1)
        values = [r[metric] for r in per_prompt if r.get(metric) is not None]
        ax.boxplot(values, widths=0.5)
        ax.scatter([1 + 0.08 * ((i % 5) - 2) for i in range(len(values))], values, s=10, alpha=0.6)
        ax.set_title(metric)
        ax.set_xticks([])
    fig.suptitle("per-prompt metric distributions")
    return figure_png(fig)


def plot_diversity_vs_fidelity(rows: Sequence[Mapping[str, Any]], fidelity: str = "CLIP-T",
                               diversity: str = "DIV", note: str = "") -> bytes:
    """PNG: diversity against prompt fidelity, one point per row, annotated with its guidance scale.

    rows: dicts with `guidance`, the `fidelity` and `diversity` metrics, and optionally `label` (one line per
    label, points joined in order of guidance) — e.g. one row per (method, guidance) of a sweep.
    `note` (e.g. that the evaluators are random-weight ones) goes under the title.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(str(r.get("label", "")) for r in rows))
    for label in labels:
        pts = sorted((r for r in rows if str(r.get("label", "")) == label and r.get(fidelity) is not None
                      and r.get(diversity) is not None), key=lambda r: float(r["guidance"]))
        xs, ys = [float(r[fidelity]) for r in pts], [float(r[diversity]) for r in pts]
        ax.plot(xs, ys, marker="o", label=label or None)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"g={float(r['guidance']):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"prompt fidelity ({fidelity})")
    ax.set_ylabel(f"diversity ({diversity})")
    ax.set_title("\n".join(["Diversity vs prompt fidelity", *textwrap.wrap(note, 70)]), fontsize=9)
    if any(labels):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig)


class Report:
    """An HTML report built section by section, written as one self-contained file."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def notice(self, text: str) -> "Report":
        self.parts.append(f'<div class="notice">{html.escape(text)}</div>')
        return self

    def heading(self, text: str) -> "Report":
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], caption: str = "") -> "Report":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                       for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        return self

    def figure(self, png: bytes, caption: str = "") -> "Report":
        self.parts.append(f'<figure><img src="{png_data_uri(png)}" alt="{html.escape(caption)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return self

    def images(self, label: str, images: Iterable, real: bool = False, size: int = 128) -> "Report":
        cls = "row real" if real else "row"
        tags = "".join(f'<img src="{image_data_uri(im, size)}" alt="">' for im in images)
        self.parts.append(f'<div class="label">{html.escape(label)}</div><div class="{cls}">{tags}</div>')
        return self

    def prompt_grids(self, groups: Mapping[str, Sequence], real: Sequence, scores: Optional[Mapping[str, Mapping]] = None
                     ) -> "Report":
        """Each prompt's images in a row, the real photos (green border) at the top for comparison."""
        self.images("real photos", real, real=True)
        for prompt, imgs in groups.items():
            s = (scores or {}).get(prompt) or {}
            extra = "  ".join(f"{m} {fmt(s.get(m))}" for m in METRIC_COLUMNS if s.get(m) is not None)
            self.images(f"{prompt}    {extra}".rstrip(), imgs)
        return self

    def settings(self, data: Mapping[str, Any], caption: str = "Models and settings") -> "Report":
        self.heading(caption)
        self.parts.append(f"<pre>{html.escape(json.dumps(data, indent=2, default=str))}</pre>")
        return self

    def code(self, lines: Sequence[str], caption: str) -> "Report":
        """Shell lines under a heading, as a user pastes them."""
        self.heading(caption)
        self.parts.append(f"<pre class=\"code\">{html.escape(chr(10).join(lines))}</pre>")
        return self

    def html(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.parts) + "</body></html>")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.html().encode("utf-8"))
        return path


def table_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text of a table (missing values as empty cells, numbers unrounded)."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()
