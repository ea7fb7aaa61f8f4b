"""Sweeps: identically seeded cells, resumable runs, sweep.csv, contact sheets and per-cell metrics."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.core import config as C
from boothkit.generate import generation as G
from boothkit.evaluate import sweep as S
from boothkit.core.errors import BoothkitError, ConfigError
from boothkit.adapters.lora import adapter_metadata, save_lora_file
from boothkit.adapters.inject import add_lora, lora_state_dict

PROMPT = "a photo of sks dog"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def sweep_cfg(**values) -> C.RunConfig:
    return C.resolve(S.SWEEP_SECTIONS, {"metrics": {"clip_model": "tiny"}}, values)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_path(tiny_path, tmp_path_factory) -> Path:
    """A boothkit LoRA on the tiny model (UNet + text encoder, small random lora_B so it matters)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path), safety_checker=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for comp, model, targets in (("unet", pipe.unet, UNET_TARGETS), ("text_encoder", pipe.text_encoder, TE_TARGETS)):
        add_lora(model, targets, 4, 4.0)
        layers[comp] = {k: torch.randn(v.shape, generator=gen) * 0.1 if "lora_B" in k else v
                        for k, v in lora_state_dict(model).items()}
    meta = {"unet": adapter_metadata(UNET_TARGETS, 4, 4.0), "text_encoder": adapter_metadata(TE_TARGETS, 4, 4.0)}
    return save_lora_file(tmp_path_factory.mktemp("lora") / "l.safetensors", layers, meta,
                          {"base_model": str(tiny_path), "token": "sks", "class_noun": "dog"})


@pytest.fixture(scope="module")
def swept(lora_path, tmp_path_factory):
    """2 guidance x 2 UNet scales x 1 TE scale, 2 images per cell, one prompt (kept small: CPU tests)."""
    out = tmp_path_factory.mktemp("sweep")
    flags = dict(lora=str(lora_path), prompt=[PROMPT], guidance="2,6", unet_scale="0,1", text_encoder_scale="0",
                 num_images=2, steps=2, out=str(out))
    S.run_sweep(sweep_cfg(**flags))
    return out, flags


def cell_files(out: Path, g, u, t, n=2, seed=0, prompt=PROMPT, p=0) -> list[Path]:
    return S.image_paths(out, S.Cell(p, g, u, t), prompt, n, seed)


@pytest.mark.slow
def test_sweep_writes_every_cell_with_parameters_and_csv(swept):
    out, _ = swept
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 2 * 1  # cells x images x prompts
    for row in rows:
        params = G.parse_parameters(Image.open(out / row["file"]).text["parameters"])
        assert params["prompt"] == row["prompt"] == PROMPT
        assert (params["CFG scale"], params["UNet scale"], params["TE scale"], params["Seed"]) == (
            row["guidance"], row["unet_scale"], row["text_encoder_scale"], row["seed"])
    assert {(r["guidance"], r["unet_scale"], r["text_encoder_scale"]) for r in rows} == {
        (g, u, "0") for g in ("2", "6") for u in ("0", "1")}
    assert C.load_toml(out / "sweep_config.toml")["sweep"]["guidance"] == "2,6"


@pytest.mark.slow
def test_cells_are_seeded_identically(swept, tiny_path):
    out, _ = swept
    # LoRA at 0/0 is the base model: its cell is exactly what plain diffusers draws from seeds 0 and 1
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(str(tiny_path), safety_checker=None, requires_safety_checker=False)
    for i, path in enumerate(cell_files(out, 6, 0, 0)):
        ref = base(PROMPT, num_inference_steps=2, guidance_scale=6,
                   generator=torch.Generator("cpu").manual_seed(i)).images[0]
        assert np.array_equal(pixels(path), np.asarray(ref, dtype=np.int16))
    a0, a1 = cell_files(out, 6, 0, 0)
    assert np.abs(pixels(a0) - pixels(a1)).max() > 10  # different seeds within a cell
    # only the swept value changes between neighbouring cells, and each one changes the picture
    for other in ((6, 1, 0), (2, 0, 0)):
        assert np.abs(pixels(cell_files(out, *other)[0]) - pixels(a0)).max() > 3, other


def test_contact_sheet_layout(swept):
    out, _ = swept
    sheets = list(out.glob("sheet-p00-*.png"))
    assert len(sheets) == 1
    sheet = pixels(sheets[0])
    cw, ch = 2 * 64, 64  # a cell is its two 64-px images side by side
    h, w = sheet.shape[:2]
    left, top = w - 2 * cw, h - 2 * ch  # columns: guidance 2, 6; rows: (u, t) = (0, 0), (1, 0)
    assert left > 0 and top > 0
    assert (sheet[:top] < 128).any() and (sheet[top:, :left] < 128).any()  # labels are drawn
    for r, (u, t) in enumerate(((0, 0), (1, 0))):
        for c, g in enumerate((2, 6)):
            cell = np.asarray(S.cell_image([Image.open(p) for p in cell_files(out, g, u, t)]), dtype=np.int16)
            assert np.array_equal(sheet[top + r * ch:top + (r + 1) * ch, left + c * cw:left + (c + 1) * cw], cell)
    with Image.open(sheets[0]) as im:  # the sheet's parameters: its cells' settings, the axes, every seed
        p = G.parse_parameters(im.text["parameters"])
    with Image.open(cell_files(out, 2, 0, 0)[0]) as im:
        cell_params = G.parse_parameters(im.text["parameters"])
    same = ("prompt", "Steps", "Sampler", "Size", "Model", "Precision", "Device", "Lora")
    assert all(p[k] == cell_params[k] for k in same) and "Seed" not in p
    assert (p["CFG scale"], p["UNet scale"], p["Seeds"]) == ("columns 2 6", "rows 0 1", "0-1 in every cell")


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_resumes_after_interrupt(lora_path, tmp_path, monkeypatch):
    calls = []
    real = G.generate_images

    def counting(*args, **kwargs):
        calls.append(kwargs["guidance"])
        if fail_at and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "generate_images", counting)
    cfg = sweep_cfg(lora=str(lora_path), prompt=["a dog", "a cat"], guidance="1,3", num_images=1, steps=1,
                    out=str(tmp_path))
    fail_at = 3  # interrupted while making the third of four cells
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(cfg)
    assert len(list(tmp_path.rglob("*.png"))) == 2 and not list(tmp_path.rglob("*.tmp"))
    fail_at, calls[:] = 0, []
    S.run_sweep(cfg)
    assert len(calls) == 2  # only the two unfinished cells
    pngs = sorted(tmp_path.rglob("cells/**/*.png"))
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    calls[:] = []
    S.run_sweep(cfg)
    assert calls == [] and [p.stat().st_mtime_ns for p in pngs] == mtimes
    pngs[-1].unlink()  # a cell with a missing image is unfinished
    S.run_sweep(cfg)
    assert len(calls) == 1
    with open(tmp_path / "sweep.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 1 * 2  # cells x images x prompts
    assert len(list(tmp_path.glob("sheet-*.png"))) == 2
    with pytest.raises(BoothkitError, match="steps"):
        S.run_sweep(sweep_cfg(lora=str(lora_path), prompt=["a dog"], guidance="1,3", num_images=1, steps=5,
                              out=str(tmp_path)))


def test_axis_values_are_validated(tmp_path):
    base = dict(lora="x", prompt=["p"], out=str(tmp_path))
    with pytest.raises(ConfigError, match="sweep.guidance"):
        sweep_cfg(**base, guidance="5,seven")
    with pytest.raises(ConfigError, match="repeats"):
        sweep_cfg(**base, unet_scale="1,1")
    with pytest.raises(ConfigError, match="minimum"):
        sweep_cfg(**base, guidance="-1")
    with pytest.raises(ConfigError, match="prompt"):
        sweep_cfg(lora="x", out=str(tmp_path))
    assert sweep_cfg(**base, guidance="5, 7.5,15").sweep.axes()["guidance"] == (5.0, 7.5, 15.0)
    (tmp_path / "p.txt").write_text("# comment\na dog\n\na cat on a roof\n")
    cfg = sweep_cfg(lora="x", prompt=["first"], prompts_file=str(tmp_path / "p.txt"), out=str(tmp_path))
    assert S.load_prompts(cfg.sweep) == ["first", "a dog", "a cat on a roof"]


@pytest.mark.slow
def test_metrics_per_cell_and_plot(swept):
    from transformers import CLIPModel, CLIPProcessor

    from boothkit.evaluate.metrics import tiny_evaluator_path

    out, flags = swept
    S.run_sweep(sweep_cfg(**flags, metrics=True))  # every cell is finished: only the metrics are computed
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and (out / "metrics.png").stat().st_size > 1000
    assert all(0 < float(r["DIV"]) < 1 for r in rows)
    # CLIP-T of one cell, recomputed with transformers directly
    row = next(r for r in rows if (r["guidance"], r["unet_scale"], r["text_encoder_scale"]) == ("6", "1", "0"))
    folder = tiny_evaluator_path("clip")
    model, proc = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in cell_files(out, 6, 1, 0)]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        txt = model.get_text_features(**proc.tokenizer([PROMPT], padding=True, return_tensors="pt"))
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    expected = torch.nn.functional.cosine_similarity(img, txt).mean().item()
    assert float(row["CLIP-T"]) == pytest.approx(expected, abs=1e-5)


def test_cli_sweep_on_finished_cells(swept):
    from boothkit.cli import main

    out, f = swept
    argv = ["sweep", "--lora", f["lora"], "--prompt", PROMPT, "--guidance", f["guidance"], "--unet-scale",
            f["unet_scale"], "--text-encoder-scale", f["text_encoder_scale"], "-n", "2", "--steps", "2",
            "--out", str(out), "--clip-model", "tiny"]
    before = (out / "sweep.csv").read_text()
    pngs = sorted(out.rglob("cells/**/*.png"))
    stamps = [p.stat().st_mtime_ns for p in pngs]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and (out / "sweep.csv").read_text() == before
    assert pngs and [p.stat().st_mtime_ns for p in pngs] == stamps  # no finished cell was drawn again
    with pytest.raises(SystemExit) as exc:
        main(argv[:-4] + ["--out", str(out), "--guidance", "1,x"])
    assert exc.value.code == 2


def test_rerun_after_the_lora_changed_is_refused(lora_path, tmp_path):
    import shutil

    lora = tmp_path / "lora.safetensors"
    shutil.copy(lora_path if lora_path.is_file() else lora_path / "pytorch_lora_weights.safetensors", lora)
    cfg = sweep_cfg(lora=str(lora), prompt=["a dog"], guidance="1", num_images=1, steps=1, out=str(tmp_path / "s"))
    S.run_sweep(cfg)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
    # same path, a different valid file (e.g. retrained): old cells would be stale
    save_file({k: v + 1 for k, v in load_file(lora).items()}, lora, metadata=meta)
    with pytest.raises(BoothkitError, match="earlier version of --lora"):
        S.run_sweep(cfg)


@pytest.mark.parametrize("broken, said", [
    ("lpips", "are not imported"),  # LPIPS weights never imported
    ("clip", "--clip-model"),  # a CLIP model that cannot be loaded
])
def test_metrics_evaluators_fail_before_any_sampling(lora_path, tmp_path, monkeypatch, broken, said):
    """--metrics loads its evaluators first: a missing one fails before the sweep draws a picture."""
    from boothkit.evaluate import metrics as M

    values = dict(lora=str(lora_path), prompt=[PROMPT], guidance="2", unet_scale="1", text_encoder_scale="0",
                  num_images=2, steps=2, out=str(tmp_path / "s"), metrics=True)
    if broken == "lpips":
        monkeypatch.setattr(M, "lpips_weights_path", lambda net: tmp_path / "nowhere" / f"{net}.safetensors")
        cfg = sweep_cfg(**values)
    else:
        cfg = C.resolve(S.SWEEP_SECTIONS, {"metrics": {"clip_model": str(tmp_path / "no-clip")}}, values)
    drawn = []
    monkeypatch.setattr(S, "generate_cells", lambda *a, **k: drawn.append(a))
    with pytest.raises(BoothkitError, match=said):
        S.run_sweep(cfg)
    assert drawn == [] and not list((tmp_path / "s").glob("**/*.png"))


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_exits_130_and_the_rerun_makes_only_the_rest(lora_path, tmp_path):
    """Issue 28: a real SIGINT once the first cell's picture is saved (held there until the signal lands): one
    line, exit 130, the cell kept; the same command then makes only the other cells."""
    import os
    import signal
    import subprocess
    import sys

    from processes import paused, signal_at

    out, log, marker = tmp_path / "sweep", tmp_path / "sweep.log", tmp_path / "held"
    args = ["sweep", "--lora", lora_path, "--prompt", "a dog", "--guidance", "1,2,3", "--num-images", 1,
            "--steps", 1, "--out", out]
    cmd, extra = paused(args, "boothkit.generate.generation:save_png:1", marker)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rc = signal_at(cmd, marker, {**env, **extra}, signal.SIGINT, log=log)
    err = log.read_text()
    assert rc == 130 and err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    [first] = out.glob("cells/*/*/*.png")
    kept = first.read_bytes()
    again = subprocess.run([sys.executable, "-m", "boothkit", *map(str, args)], env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("cells/*/*/*.png"))) == 3 and first.read_bytes() == kept
