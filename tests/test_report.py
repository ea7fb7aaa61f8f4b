"""HTML reports: self-contained, escaped, with the numbers and plots they are given."""
from __future__ import annotations

import base64
import csv
import io
import re

import numpy as np
from PIL import Image

from boothkit.core import report as R


def img(seed: int, size: int = 300) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size // 2, 3), dtype=np.uint8))


def decode_uri(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_fmt():
    assert R.fmt(None) == "–" and R.fmt(float("nan")) == "–"
    assert R.fmt(0.12345) == "0.123" and R.fmt(3) == "3" and R.fmt("x") == "x"


def test_thumbnail_keeps_aspect_and_bounds_size():
    thumb = decode_uri(R.image_data_uri(img(0), size=64))
    assert thumb.size == (32, 64)


def test_report_is_self_contained_and_escaped(tmp_path):
    rows = [{"method": "boothkit", "DINO": 0.6681, "CLIP-I": 0.8, "CLIP-T": 0.3, "PRES": None, "DIV": 0.4}]
    rep = (R.Report("t").notice("numbers are not meaningful")
           .table(rows, ("method",) + R.METRIC_COLUMNS)
           .prompt_grids({"a <b>sks</b> dog": [img(1), img(2)]}, [img(3)], {"a <b>sks</b> dog": {"DINO": 0.5}})
           .settings({"clip_model": "openai/clip-vit-base-patch32"}))
    path = rep.write(tmp_path / "r.html")
    html = path.read_text()
    assert "<td>0.668</td>" in html and "<td>–</td>" in html
    assert "numbers are not meaningful" in html and "openai/clip-vit-base-patch32" in html
    assert "<b>sks</b>" not in html and "&lt;b&gt;sks&lt;/b&gt;" in html
    assert html.count("data:image/jpeg;base64,") == 3
    assert not re.search(r'src="(?!data:)', html)  # nothing fetched from elsewhere
    assert not list(tmp_path.glob(".*.tmp"))


def test_plots_are_pngs_that_follow_their_data():
    rows = [{"label": "lora", "guidance": g, "CLIP-T": 0.25 + 0.01 * g, "DIV": 0.5 - 0.02 * g} for g in (3, 5, 7.5)]
    rows += [{"label": "full", "guidance": g, "CLIP-T": 0.27 + 0.01 * g, "DIV": 0.45 - 0.02 * g} for g in (3, 7.5)]
    a = R.plot_diversity_vs_fidelity(rows)
    b = R.plot_diversity_vs_fidelity(rows[:3])
    assert a.startswith(b"\x89PNG") and Image.open(io.BytesIO(a)).size[0] > 100
    assert a != b
    per_prompt = [{"prompt": f"p{i}", "DINO": 0.5 + i / 100, "CLIP-T": 0.3, "DIV": None} for i in range(5)]
    assert R.plot_metric_distributions(per_prompt).startswith(b"\x89PNG")


def test_table_csv_roundtrip():
    rows = [{"method": "m", "DINO": 0.1234567, "PRES": None}]
    parsed = list(csv.DictReader(io.StringIO(R.table_csv(rows, ("method", "DINO", "PRES")))))
    assert parsed == [{"method": "m", "DINO": "0.1234567", "PRES": ""}]
