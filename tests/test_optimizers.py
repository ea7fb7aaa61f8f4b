"""The optimizers users ask for by name (issue 27): Prodigy, schedule-free AdamW and Adafactor train, checkpoint and
resume bit for bit like AdamW; schedule-free's saved weights are its average; Prodigy reads the rates as
multipliers."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from boothkit.adapters import LORA_FILE
from boothkit.cli import main
from boothkit.core import config as C
from boothkit.core.errors import ConfigError
from boothkit.train import checkpoint as ckpt
from boothkit.train.optimizers import averaged, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def train(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    return err


@pytest.mark.parametrize("name, cls", [("prodigy", "prodigy"), ("adamw-schedulefree", "adamwschedulefree"),
                                       ("adafactor", "adafactor")])
def test_each_optimizer_trains_and_resumes_bit_for_bit(demo_subject, tmp_path, capsys, name, cls):
    out = tmp_path / "run"
    args = ["train", "--instance-dir", demo_subject, "--class-noun", "dog", "--no-prior", "--max-steps", 6,
            "--rank", 2, "--checkpoint-every", 2, "--checkpoints-keep", 3, "--optimizer", name, "--log-every", 1]
    if name != "prodigy":
        args += ["--learning-rate", "1e-3"]
    train(capsys, *args, "--output-dir", out)
    lora = load_file(out / LORA_FILE)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it learned something
    assert C.load_toml(out / "config.toml")["train"]["optimizer"] == name
    assert ckpt.load_checkpoint(ckpt.list_checkpoints(out)[0][1])["state"]["config"]["optimizer"] == cls  # resume
    again = tmp_path / "again"  # the run stopped after step 2, resumed to the end
    shutil.copytree(out, again)
    for _, path in ckpt.list_checkpoints(again)[1:]:
        shutil.rmtree(path)
    (again / LORA_FILE).unlink()
    train(capsys, *args, "--output-dir", again, "--resume")
    resumed = load_file(again / LORA_FILE)
    assert all(torch.equal(resumed[k], lora[k]) for k in lora), f"{name}: resumed LoRA differs"


def test_schedule_free_weights_are_its_average_inside_averaged_and_the_training_point_after():
    """What schedulefree's docs say eval() does: x = lerp(y, z, 1 - 1/beta1), computed here from its state."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    cfg = C.resolve(C.TRAIN_SECTIONS, {"data": {"instance_dir": "p", "class_noun": "dog"},
                                       "train": {"output_dir": "o", "optimizer": "adamw-schedulefree"}})
    opt, kind = make_optimizer(cfg, [{"params": [w], "lr": 0.1}])
    assert kind == "adamw-schedulefree"
    for _ in range(3):
        (w ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    y, z = w.detach().clone(), opt.state[w]["z"].clone()
    beta1 = opt.param_groups[0]["betas"][0]
    with averaged(opt):
        torch.testing.assert_close(w.detach(), torch.lerp(y, z, 1 - 1 / beta1))
    torch.testing.assert_close(w.detach(), y)


def test_prodigy_reads_the_rates_as_multipliers_and_schedule_free_refuses_a_schedule(tmp_path, capsys):
    cfg = C.resolve(C.TRAIN_SECTIONS, {"data": {"instance_dir": "p", "class_noun": "dog"},
                                       "train": {"output_dir": "o", "optimizer": "prodigy", "learning_rate": 1e-4}})
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt, _ = make_optimizer(cfg, [{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}])
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--instance-dir", str(tmp_path), "--class-noun", "dog", "--output-dir", str(tmp_path / "o"),
              "--optimizer", "adamw-schedulefree", "--lr-scheduler", "cosine"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: train.lr_scheduler cosine: adamw-schedulefree needs no "
                                               "schedule (--lr-scheduler constant; --lr-warmup-steps is its own "
                                               "warm-up)")
    with pytest.raises(ConfigError, match="train.optimizer"):
        C.resolve(C.TRAIN_SECTIONS, {"train": {"optimizer": "lion"}})
