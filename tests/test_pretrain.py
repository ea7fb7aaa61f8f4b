"""The pretraining recipe runs end to end on a tiny slice (so it cannot rot), and its pieces do what they say."""
import csv
import json
import os

import pytest
import torch

from boothkit.cli import main
from boothkit.models.mini import mini_dir
from processes import kill_at, paused


def run(*args):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args])
    return exc.value.code


@pytest.mark.slow
def test_every_stage_runs_and_ships_a_loadable_model(tmp_path, one_thread):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, ViTModel

    common = ["--work-dir", str(tmp_path / "work"), "--emoji-file", str(mini_dir() / "reference.npz"),
              "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1"]
    for stage in ("vae", "unet", "clip", "dino"):
        assert run("--stage", stage, *common) == 0, stage
        rows = list(csv.DictReader(open(tmp_path / "work" / stage / "log.csv")))
        assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    # a stage that has finished resumes to "done": no new rows
    assert run("--stage", "vae", *common) == 0
    assert len(list(csv.DictReader(open(tmp_path / "work" / "vae" / "log.csv")))) == 2
    ship = tmp_path / "ship"
    assert run("--stage", "ship", "--work-dir", str(tmp_path / "work"), "--ship-dir", str(ship),
               "--emoji-file", str(mini_dir() / "reference.npz")) == 0
    recipe = json.loads((ship / "recipe.json").read_text())
    assert recipe["steps"] == {"vae": 2, "unet": 2, "clip": 2, "dino": 2}
    from safetensors.torch import load_file

    for f in ship.rglob("*.safetensors"):  # shipped in half precision: the package stays small
        assert {t.dtype for t in load_file(f).values()} == {torch.float16}, f
    vae = AutoencoderKL.from_pretrained(ship / "model" / "vae")
    assert vae.config.scaling_factor == pytest.approx(recipe["latent_scaling_factor"])
    assert UNet2DConditionModel.from_pretrained(ship / "model" / "unet").config.sample_size == 16
    CLIPModel.from_pretrained(ship / "clip")
    ViTModel.from_pretrained(ship / "dino", add_pooling_layer=False)
    assert json.loads((ship / "reference.json").read_text())["frequent"]
    # Shipping again replaces the shipped folder whole, once complete: killed before its swap, the earlier
    # weights stay; the hand-written files beside them (ATTRIBUTION.md) carry over.
    (ship / "ATTRIBUTION.md").write_text("by hand\n")
    assert run("--stage", "vae", *common[:-4], "--steps", "3", "--batch-size", "4", "--checkpoint-every", "1") == 0

    def shipped():
        return {str(p.relative_to(ship)): p.read_bytes() for p in sorted(ship.rglob("*")) if p.is_file()}

    before, marker = shipped(), tmp_path / "held"
    ship_args = ["pretrain", "--stage", "ship", "--work-dir", tmp_path / "work", "--ship-dir", ship,
                 "--emoji-file", mini_dir() / "reference.npz"]
    cmd, extra = paused(ship_args, "boothkit.core.files:fsync_tree:1", marker)
    kill_at(cmd, marker, {**os.environ, **extra})
    assert shipped() == before
    assert run(*map(str, ship_args[1:])) == 0
    after = shipped()
    assert after["ATTRIBUTION.md"] == b"by hand\n" and after.keys() == before.keys()
    assert json.loads(after["recipe.json"])["steps"]["vae"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the killed ship's temp cleared


def test_nt_xent_matches_a_hand_computation():
    from boothkit.mini.stages import nt_xent

    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 0 of a: positive b0 (cos 1), negatives a1, b1 (cos 0) at temperature 0.1
    expected = -torch.log(torch.exp(torch.tensor(10.0)) / (torch.exp(torch.tensor(10.0)) + 2))
    assert nt_xent(a, b).item() == pytest.approx(expected.item(), rel=1e-3)  # float32 log-sum-exp


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    from boothkit.mini.stages import lr_lambda

    f = lr_lambda(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and 0.1 < f(55) < 1.0


def test_bad_input_is_one_line(tmp_path, capsys):
    assert run("--stage", "vae", "--work-dir", str(tmp_path), "--emoji-file", str(tmp_path / "nope.npz")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pretrain.emoji_file" in err
    assert run("--stage", "nope", "--work-dir", str(tmp_path)) == 2
    assert run("--stage", "ship", "--work-dir", str(tmp_path / "empty")) == 2
    assert "has no" in capsys.readouterr().err
