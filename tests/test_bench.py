"""Benchmarks on the tiny model at CI size: dataset parsing, the dreambench protocol (resumable), prior-effect."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from boothkit.evaluate import bench as B
from boothkit.evaluate import prior_effect as PE
from boothkit.evaluate import metrics as M
from boothkit.core.errors import ConfigError, DataError

BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"
DEMO = Path(__file__).resolve().parents[1] / "src" / "boothkit" / "assets" / "demo_subject"

PROMPTS = """Classes

subject_name,class
pup,dog
thing,backpack

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token)
]
"""


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    photos = sorted(DEMO.glob("*.jpg"))
    for name, picks in (("pup", photos[:3]), ("thing", photos[2:5])):
        (root / name).mkdir(parents=True)
        for p in picks:
            shutil.copy(p, root / name / p.name)
    (root / B.PROMPTS_FILE).write_text(PROMPTS)
    return root


def test_parse_benchmark_dataset():
    if not BENCHMARK.is_dir():
        pytest.skip(f"no benchmark at {BENCHMARK}")
    ds = B.parse_dataset(BENCHMARK)
    assert len(ds.classes) == 30 and ds.classes["bear_plushie"] == "stuffed animal"
    assert len(ds.object_prompts) == 25 and len(ds.live_prompts) == 25
    live = [s for s in ds.classes if ds.classes[s] in ("dog", "cat")]
    assert len(live) == 9
    dog = B.subject_prompts(ds, "dog", "sks", ("dog", "cat"))
    assert dog[0] == "a sks dog in the jungle" and "a sks dog wearing a santa hat" in dog
    assert B.subject_prompts(ds, "backpack", "sks", ("dog", "cat"), limit=2) == [
        "a sks backpack in the jungle", "a sks backpack in the snow"]


def test_class_noun_ablation_nouns_and_prompts(dataset):
    ds = B.parse_dataset(dataset)

    def bench(**kw):
        return B.BenchConfig(dataset=str(dataset), out="x", **kw)

    assert B.subject_prompts(ds, "pup", "sks", ("dog",), limit=1, noun="") == ["a sks wearing a red hat"]
    assert B.subject_prompts(ds, "thing", "sks", (), limit=1, noun="can") == ["a sks can in the jungle"]
    assert B.trained_noun(bench(), ds, "pup") == "dog"
    assert B.trained_noun(bench(class_nouns="none"), ds, "pup") == ""
    wrong = bench(class_nouns="wrong", wrong_nouns=("dog=cup, backpack = can",))
    assert [B.trained_noun(wrong, ds, s) for s in ("pup", "thing")] == ["cup", "can"]
    with pytest.raises(ConfigError, match="--wrong-nouns: no wrong noun for class 'backpack' \\(subject thing\\)"):
        B.trained_noun(bench(class_nouns="wrong", wrong_nouns=("dog=cup",)), ds, "thing")
    with pytest.raises(ConfigError, match="--wrong-nouns: expected CLASS=NOUN, got 'dog'"):
        B.parse_wrong_nouns(["dog"])
    with pytest.raises(ConfigError, match="is the class noun itself"):
        B.trained_noun(bench(class_nouns="wrong", wrong_nouns=("dog=dog",)), ds, "pup")


def test_dataset_errors(tmp_path, dataset):
    with pytest.raises(DataError, match="prompts_and_classes.txt"):
        B.parse_dataset(tmp_path)
    with pytest.raises(ConfigError, match="--subjects: unknown subject 'cat'"):
        B.select_subjects(B.parse_dataset(dataset), ["pup,cat"])
    assert B.select_subjects(B.parse_dataset(dataset), []) == ["pup", "thing"]


def test_aggregate_means_over_subjects():
    def res(subject, dino, pres, ref):
        return {"subject": subject, "overall": {"DINO": dino, "CLIP-I": 0.5, "CLIP-T": 0.3, "PRES": pres, "DIV": None},
                "reference": {"DINO": ref, "CLIP-I": 0.9, "CLIP-T": None, "PRES": None, "DIV": None}}

    rows = B.aggregate({"lora": [res("a", 0.6, 0.4, 0.8), res("b", 0.7, None, 0.7)],
                        "full": [res("a", 0.65, 0.5, 0.8)]})
    assert [r["method"] for r in rows] == ["lora", "full", "real images"]
    assert rows[0]["DINO"] == pytest.approx(0.65) and rows[0]["PRES"] == pytest.approx(0.4)
    assert rows[0]["DIV"] is None and rows[0]["subjects"] == 2
    assert rows[2]["DINO"] == pytest.approx(0.75) and rows[2]["subjects"] == 2


def _bench_args(dataset, out, train_toml, subjects):
    return ["bench", "dreambench", "--dataset", str(dataset), "--train-config", str(train_toml), "--subjects", subjects,
            "--prompts-limit", "2", "--images-per-prompt", "2", "--pres-images", "2", "--sample-steps", "2",
            "--clip-model", "tiny", "--dino-model", "tiny", "--lpips-size", "64", "--method", "lora", "--out", str(out)]


@pytest.mark.slow
def test_dreambench_end_to_end_and_resumable(tmp_path, dataset, tiny_path, lpips_weights):
    from boothkit.cli import main

    train_toml = tmp_path / "lora.toml"
    train_toml.write_text("[train]\nmax_steps = 2\n[prior]\nprior = false\n")
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exit_:
        main(_bench_args(dataset, out, train_toml, "pup"))
    assert exit_.value.code == 0
    pup = out / "lora" / "pup"
    first = json.loads((pup / "results.json").read_text())
    manifest = json.loads((pup / "samples" / "samples.json").read_text())["samples"]
    assert [e["prompt"] for e in manifest] == ["a sks dog wearing a red hat"] * 2 + ["a sks dog in the snow"] * 2
    assert first["class_prompt"] == "a photo of dog" and first["num_class_images"] == 2
    assert (pup / "model" / "pytorch_lora_weights.safetensors").is_file()
    learned = first["learned"]
    assert learned["prompt"] == "a photo of sks dog" and learned["n"] == 2
    assert all(-1 <= learned[k] <= 1 for k in B.LEARNED_COLUMNS)
    for when in ("before", "after"):
        shown = json.loads((pup / f"instance_{when}" / "samples.json").read_text())["samples"]
        assert [(e["prompt"], e["seed"]) for e in shown] == [("a photo of sks dog", 0), ("a photo of sks dog", 1)]
    mtime = (pup / "results.json").stat().st_mtime_ns

    with pytest.raises(SystemExit) as exit_:  # adds one subject; the finished one is not redone
        main(_bench_args(dataset, out, train_toml, "pup,thing"))
    assert exit_.value.code == 0
    assert (pup / "results.json").stat().st_mtime_ns == mtime
    thing = json.loads((out / "lora" / "thing" / "results.json").read_text())
    assert thing["per_prompt"][0]["prompt"] == "a sks backpack in the jungle"

    rows = list(csv.DictReader((out / "dreambench.csv").open()))
    assert [r["method"] for r in rows] == ["lora", "real images"]
    for metric in M.METRICS:
        assert float(rows[0][metric]) == pytest.approx(np.mean([first["overall"][metric], thing["overall"][metric]]))
    assert float(rows[1]["DINO"]) == pytest.approx(np.mean([first["reference"]["DINO"], thing["reference"]["DINO"]]))
    html = (out / "dreambench.html").read_text()
    assert M.TINY_NOTE in html and "a sks backpack in the jungle" in html
    assert "a photo of sks dog, before training" in html and "DINO rose for" in html
    assert json.loads((out / "dreambench.json").read_text())["warning"] == M.TINY_NOTE


@pytest.mark.slow
def test_dreambench_without_class_noun(tmp_path, dataset, tiny_path, lpips_weights, capsys):
    from boothkit.cli import main

    prior_toml = tmp_path / "prior.toml"
    prior_toml.write_text("[train]\nmax_steps = 2\n[prior]\nprior = true\n")
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exit_:  # no class noun, no class images: refused before any training
        main(_bench_args(dataset, out, prior_toml, "pup") + ["--class-nouns", "none"])
    assert exit_.value.code != 0 and not (out / "lora" / "pup").exists()
    assert "--class-nouns none" in capsys.readouterr().err

    train_toml = tmp_path / "lora.toml"
    train_toml.write_text("[train]\nmax_steps = 2\n[prior]\nprior = false\n")
    with pytest.raises(SystemExit) as exit_:
        main(_bench_args(dataset, out, train_toml, "pup") + ["--class-nouns", "none"])
    assert exit_.value.code == 0
    pup = out / "lora" / "pup"
    res = json.loads((pup / "results.json").read_text())
    assert res["train"]["data"]["instance_prompt"] == "a photo of {token}"
    assert [p["prompt"] for p in res["per_prompt"]] == ["a sks wearing a red hat", "a sks in the snow"]
    assert res["class_prompt"] == "a photo of dog" and res["trained_noun"] == ""  # PRES: the true class


@pytest.mark.slow
def test_prior_effect_ci_size(tmp_path, tiny_path, lpips_weights, demo_subject):
    from boothkit.core import config as C

    train_toml = tmp_path / "t.toml"
    train_toml.write_text("[train]\nlearning_rate = 0.01\n[prior]\nclass_steps = 2\n")
    cfg = C.resolve(PE.PRIOR_EFFECT_SECTIONS, {"effect": {
        "instance_dir": str(demo_subject), "class_noun": "dog", "train_config": str(train_toml), "max_steps": 3,
        "num_class_images": 2, "samples": 2, "sample_steps": 2, "drift_draws": 2, "out": str(tmp_path / "pe")}})
    result = PE.run_prior_effect(cfg, progress=False)
    rows = {r["model"]: r for r in result["table"]}
    frozen, with_, without, anchored = (rows[v] for v in PE.VARIANTS)
    # the frozen model against itself: exactly no drift
    assert frozen["class_unet_mse"] == 0 and frozen["identifier_unet_mse"] == 0
    assert frozen["class_sample_lpips"] == pytest.approx(0, abs=1e-6)
    for r in (with_, without, anchored):
        assert r["identifier_unet_mse"] > 0 and r["class_unet_mse"] > 0 and r["final_loss"] is not None
    assert with_["class_unet_mse"] != without["class_unet_mse"]  # the prior loss changed training
    assert anchored["class_unet_mse"] != with_["class_unet_mse"]  # and its target matters
    saved = list(csv.DictReader((tmp_path / "pe" / "prior_effect.csv").open()))
    assert [r["model"] for r in saved] == list(PE.VARIANTS)
    assert "subject photos" in (tmp_path / "pe" / "prior_effect.html").read_text()


@pytest.mark.slow
def test_dreambench_spreads_subjects_over_processes(tmp_path, dataset, tiny_path, lpips_weights):
    """Two processes (gloo on CPU; `accelerate launch` on GPUs): one subject each, the main process aggregates."""
    import os
    import subprocess
    import sys

    train_toml = tmp_path / "lora.toml"
    train_toml.write_text("[train]\nmax_steps = 2\n[prior]\nprior = false\n")
    out = tmp_path / "bench"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "boothkit",
                           *_bench_args(dataset, out, train_toml, "pup,thing")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "process 0: subject 1/1 pup done" in log and "process 1: subject 1/1 thing done" in log
    rows = list(csv.DictReader((out / "dreambench.csv").open()))
    assert [r["method"] for r in rows] == ["lora", "real images"] and rows[0]["subjects"] == "2"


@pytest.mark.slow
def test_dreambench_runs_sdxl_unchanged(tmp_path, dataset, lpips_weights):
    """The benchmark goes through the family seam: an SDXL base model (tiny-xl) needs no other flag."""
    from boothkit.cli import main

    train_toml = tmp_path / "xl.toml"
    train_toml.write_text('[model]\nmodel = "tiny-xl"\n[train]\nmax_steps = 2\n[prior]\nnum_class_images = 2\n'
                          'class_steps = 2\n')
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exit_:
        main(_bench_args(dataset, out, train_toml, "thing"))
    assert exit_.value.code == 0
    res = json.loads((out / "lora" / "thing" / "results.json").read_text())
    assert res["train"]["model"]["model"] == "tiny-xl" and res["num_class_images"] == 2
    assert all(-1 <= res["overall"][k] <= 1 for k in ("DINO", "CLIP-I", "CLIP-T", "PRES"))
