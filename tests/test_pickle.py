"""Pickle-based weights are refused by default (one line naming the file and --allow-pickle); allowed, they load
with torch's weights-only loader, give the same weights as their safetensors twin, and a malicious pickle runs no
code."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from boothkit.core import safety
from boothkit.cli import main
from boothkit.core.errors import BoothkitError, ModelError
from boothkit.export.naming import ldm_state_dict
from boothkit.adapters.lora import lora_file
from boothkit.models.loading import load_pipeline


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def no_env_permission(monkeypatch, tmp_path):
    monkeypatch.delenv(safety.ALLOW_ENV, raising=False)
    monkeypatch.setenv("BOOTHKIT_HOME", str(tmp_path / "home"))  # converted copies land here, not in the shared cache


@pytest.fixture
def pickled_unet_model(tiny_path, tmp_path) -> Path:
    """The tiny model with its UNet stored only as a pickle (as older hub repos ship it)."""
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_path, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_pickled_model_folder_is_refused_then_loads_weights_only(pickled_unet_model, tiny_path, capsys):
    rc, err = run_cli(capsys, "generate", "--model", pickled_unet_model, "--prompt", "a dog", "--steps", 1,
                      "--out", pickled_unet_model.parent / "out")
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == (f"error: --model {pickled_unet_model} (unet/diffusion_pytorch_model.bin): a pickle file, "
                           "which can run code when loaded; convert it to .safetensors, or pass --allow-pickle to "
                           "load it with torch's weights-only loader")
    assert not (pickled_unet_model.parent / "out").exists()
    with safety.allowing_pickle():
        pipe = load_pipeline(str(pickled_unet_model))
    assert _same_weights(pipe.unet, load_pipeline(str(tiny_path)).unet)


@pytest.mark.slow
def test_pickled_single_file_checkpoint_converts_once_to_the_same_model(tiny_path, tmp_path):
    reference = load_pipeline(str(tiny_path))
    ckpt = tmp_path / "model.ckpt"  # Lightning-style, as the original SD checkpoints are
    torch.save({"state_dict": ldm_state_dict(reference.unet, reference.vae, reference.text_encoder)}, ckpt)
    with pytest.raises(ModelError, match=r"^--model .*model\.ckpt: a pickle file, which can run code"):
        load_pipeline(str(ckpt), model_config=str(tiny_path))
    with safety.allowing_pickle():
        pipe = load_pipeline(str(ckpt), model_config=str(tiny_path))
    assert _same_weights(pipe.unet, reference.unet) and _same_weights(pipe.vae, reference.vae)
    converted = list((tmp_path / "home" / "converted").iterdir())
    assert len(converted) == 1 and converted[0].suffix == ".safetensors"
    stamp = converted[0].stat().st_mtime_ns
    with safety.allowing_pickle():
        load_pipeline(str(ckpt), model_config=str(tiny_path))
    assert converted[0].stat().st_mtime_ns == stamp  # reused, not converted again


class _Payload:
    """What a hostile pickle does: run a command while it is being loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_runs_no_code_even_when_allowed(tmp_path, capsys):
    marker, bad = tmp_path / "pwned", tmp_path / "lora.bin"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1), "evil": _Payload(marker)}, bad)
    rc, err = run_cli(capsys, "export", "--lora", bad, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert rc == 2 and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    rc, err = run_cli(capsys, "export", "--allow-pickle", "--lora", bad, "--format", "kohya",
                      "--out", tmp_path / "k.safetensors")
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"error: --lora {bad}: not loadable by torch's weights-only loader")
    assert not marker.exists() and not (tmp_path / "k.safetensors").exists()


def test_pickled_lora_loads_as_its_safetensors_twin(tmp_path):
    tensors = {"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.randn(4, 8),
               "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.randn(8, 4)}
    folder = tmp_path / "old-run"
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_lora_weights.bin")
    with pytest.raises(BoothkitError, match="pytorch_lora_weights.bin: a pickle file"):
        lora_file(folder)
    with safety.allowing_pickle():
        converted = lora_file(folder)
    loaded = load_file(converted)
    assert converted.suffix == ".safetensors" and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    save_file(tensors, folder / "pytorch_lora_weights.safetensors")
    assert lora_file(folder) == folder / "pytorch_lora_weights.safetensors"  # safetensors wins when both exist


def test_environment_variable_allows_too(monkeypatch, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(BoothkitError):
        safety.as_safetensors(path, "--lora")
    monkeypatch.setenv(safety.ALLOW_ENV, "1")
    assert torch.equal(load_file(safety.as_safetensors(path, "--lora"))["a"], torch.ones(2))
