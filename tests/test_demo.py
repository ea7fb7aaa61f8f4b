"""`boothkit demo` on mini, at test size: every stage runs, the sweep is measured, the summary shows it all."""
import csv

import pytest

from boothkit.cli import main


@pytest.mark.slow
def test_demo_on_mini_end_to_end(tmp_path, lpips_weights, one_thread):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(out), "--max-steps", "10", "--num-class-images", "2", "--num-images", "2",
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
                 "an image of [ktn] girl", "guidance sweep"):
        assert text in page, text
    assert "random weights" not in page


def test_demo_guidance_must_include_the_seed_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--guidance", "5,7.5"])
    assert exc.value.code == 2 and "demo.guidance" in capsys.readouterr().err
