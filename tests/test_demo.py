"""`boothkit demo` on mini and mini-flow, at test size: every stage runs, the sweep is measured, the summary shows it all."""
import csv
import html
import os
import re
import shlex

import pytest

from boothkit.core import config as C
from boothkit.core import files, hub_ids
from boothkit.cli import main
from processes import kill_at, paused


# mini only: on mini-flow the same test passes (4 min 19 s beside two other jobs, 2026-12-07) but the suite's time
# budget holds only one; mini-flow's training and drawing are held by tests/test_mini_flow.py
@pytest.mark.slow
@pytest.mark.parametrize("model", ["mini"])
def test_demo_on_the_emoji_models_end_to_end(model, tmp_path, lpips_weights, one_thread):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", model, "--out", str(out), "--max-steps", "10", "--num-class-images", "2", "--num-images", "2",
              "--steps", "3", "--guidance", "7.5,15"])
    assert exc.value.code == 0
    rows = list(csv.DictReader(open(out / "measures.csv")))
    # 5 prompts (instance, three scenes, class) x 2 guidance values x 4 (UNet, TE) scale pairs
    assert len(rows) == 40
    scene_rows = [r for r in rows if r["prop"] != ""]
    assert len(scene_rows) == 24 and all(0.0 <= float(r["prop"]) <= 1.0 for r in scene_rows)
    assert all(-1.0 <= float(r["DINO"]) <= 1.0 and float(r["DIV"]) >= 0.0 for r in rows)
    page = (out / "index.html").read_text()
    for text in ("Before and after training", "Measures: guidance 7.5 vs 15", "next to a soft ice cream",
                 "an emoji of sks backpack", "an emoji of a backpack", "guidance sweep"):
        assert text in page, text
    assert "random weights" not in page


def test_demo_guidance_must_include_the_seed_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--guidance", "5,7.5"])
    assert exc.value.code == 2 and "demo.guidance" in capsys.readouterr().err


def test_reading_follows_the_numbers():
    from boothkit.evaluate.experiment import reading, summarise

    def row(g, u, dino, clip_t, prop, div, cls=False):
        return {"prompt": "p", "guidance": g, "unet_scale": u, "text_encoder_scale": u, "class": cls, "DINO": dino,
                "CLIP-I": 0.1, "CLIP-T": clip_t, "prop": None if cls else prop, "DIV": div}

    rows = [row(7.5, 0.0, 0.40, 0.30, 0.2, 0.40), row(7.5, 0.8, 0.60, 0.35, 0.3, 0.40),
            row(15.0, 0.0, 0.40, 0.32, 0.2, 0.30), row(15.0, 0.8, 0.61, 0.40, 0.5, 0.30),
            row(7.5, 0.8, 0.50, 0.2, None, 0.3, cls=True)]
    table = summarise(rows, (7.5, 15.0), [(0.0, 0.0), (0.8, 0.8)])
    after = next(r for r in table if r["guidance"] == 7.5 and r["LoRA (UNet / TE)"] == "0.8 / 0.8")
    assert after["PRES"] == 0.5 and after["DINO"] == 0.6 and after["class DIV"] == 0.3
    text = reading(table, 7.5, 15.0, "0.8 / 0.8")
    assert "CLIP-T rose from 0.350 to 0.400" in text and "DIV fell from 0.400 to 0.300" in text
    assert "conclusion holds" in text and "the subject was learned" in text
    rows[3]["DIV"] = 0.5  # more diverse at higher guidance: the conclusion must not be claimed
    assert "does not fully hold" in reading(summarise(rows, (7.5, 15.0), [(0.0, 0.0), (0.8, 0.8)]), 7.5, 15.0, "0.8 / 0.8")


@pytest.mark.slow
def test_demo_on_tiny_uses_the_dog_and_says_the_weights_are_random(tmp_path, one_thread):
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny", "--out", str(out), "--max-steps", "3", "--num-class-images", "2",
            "--num-images", "2", "--steps", "2"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    page = (out / "index.html").read_text()
    assert "random weights" in page and "sks dog" in page and not (out / "measures.csv").exists()
    assert f"boothkit train --model {hub_ids.SD15} --instance-dir my_photos" in page  # "The same on a real model"
    # "The same by hand": every line runs as pasted (issue 31)
    block = re.search(r'<h2>The same by hand[^<]*</h2>\s*<pre class="code">(.*?)</pre>', page, re.S).group(1)
    lines = html.unescape(block).splitlines()
    assert [shlex.split(line)[:2] for line in lines] == [["boothkit", w] for w in ("train", "generate", "sweep")]
    for line in lines:
        with pytest.raises(SystemExit) as exc:
            main(shlex.split(line)[1:])
        assert exc.value.code == 0, line
    assert list((out / "by-hand" / "images").glob("*.png")) and (out / "by-hand" / "sweep" / "sweep.csv").is_file()

    # Run again and stopped during its sweep: the demo replaces its sweep (the cells of the LoRA it just retrained)
    # only once the new one is complete, so the earlier sweep stays whole.
    def sweep_files():
        return {str(p.relative_to(out / "sweep")): p.read_bytes() for p in (out / "sweep").rglob("*") if p.is_file()}

    before = sweep_files()
    assert "sweep.csv" in before and any(k.endswith(".png") for k in before)
    assert C.load_toml(out / "sweep" / "sweep_config.toml")["sweep"]["out"] == str(out / "sweep")  # not its temp
    marker = tmp_path / "held"
    cmd, extra = paused(args, "boothkit.evaluate.sweep:generate_cells:1", marker)  # new cells made, not swapped in
    kill_at(cmd, marker, {**os.environ, **extra})
    assert sweep_files() == before
    assert [p.name for p in files.remove_stale_temps(out)] != []  # the unfinished one is a stale temp, cleared
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

