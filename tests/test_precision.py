"""--mixed-precision auto: what it picks from the hardware's flags and the probe, the cache, the warning."""
import logging

import pytest
import torch

from boothkit.core import precision as P


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake CPU: set .flags and .speedup (fp32 time / bf16 time); counts probe runs."""
    class Machine:
        flags, speedup, probes = frozenset(), 1.0, 0

    m = Machine()
    monkeypatch.setenv("BOOTHKIT_HOME", str(tmp_path))
    monkeypatch.delenv(P.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(P, "cpu_description", lambda: ("Test CPU", m.flags))

    def seconds(dtype, n=512, reps=5):
        m.probes += dtype == P.torch.float32
        return 1.0 if dtype == P.torch.float32 else 1.0 / m.speedup

    monkeypatch.setattr(P, "_matmul_seconds", seconds)
    monkeypatch.setattr(P, "_warned", set())
    return m


def test_auto_on_cpu_follows_flags_and_probe(machine):
    machine.speedup = 1 / 26  # AVX2-only EPYC: emulated bf16
    assert P.resolve("auto", "cpu") == "no" and machine.probes == 0  # no bf16 instructions: no probe needed
    machine.flags = frozenset({"avx2", "avx512_bf16"})
    machine.speedup = 1.8
    assert P.resolve("auto", "cpu") == "bf16" and machine.probes == 1
    assert P.resolve("auto", "cpu") == "bf16" and machine.probes == 1  # cached per machine
    assert "Test CPU|native" in (P.Path(P.os.environ["BOOTHKIT_HOME"]) / "precision.json").read_text()


@pytest.mark.slow
def test_training_asks_the_model_not_the_matmul(machine, tiny_path):
    """A CPU whose matmul runs 2x faster in bf16 may still train a small model slower under autocast."""
    from boothkit.models.families import SD
    from boothkit.models.loading import load_pipeline

    machine.flags, machine.speedup = frozenset({"avx512_bf16"}), 2.0
    calls = []

    def probe(value):
        return lambda: calls.append(value) or value

    assert P.resolve("auto", "cpu", probe=probe(0.4), model="small") == "no"
    assert P.resolve("auto", "cpu", probe=probe(1.7), model="big") == "bf16"
    assert P.resolve("auto", "cpu", probe=probe(0.1), model="big") == "bf16" and calls == [0.4, 1.7]  # cached
    machine.flags = frozenset()
    assert P.resolve("auto", "cpu", probe=probe(9.0), model="other") == "no" and 9.0 not in calls
    unet = load_pipeline("tiny").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert P.step_speedup(unet, SD.probe_forward(unet, 64)) > 0
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # a probe changes nothing


def test_auto_needs_a_measured_gain(machine, monkeypatch):
    machine.flags, machine.speedup = frozenset({"amx_bf16"}), 1.1  # instructions, but no faster with this torch
    assert P.resolve("auto", "cpu") == "no"
    monkeypatch.setenv(P.ENV_OVERRIDE, "bf16")
    assert P.resolve("auto", "cpu") == "bf16"


def test_explicit_choices_pass_through_and_emulated_bf16_warns_once(machine, caplog):
    machine.speedup = 1 / 26
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        assert P.resolve("no", "cpu") == "no" and not caplog.records
        assert P.resolve("bf16", "cpu") == "bf16"
        assert P.resolve("bf16", "cpu") == "bf16"
    assert len(caplog.records) == 1
    assert "Test CPU" in caplog.text and "26x slower" in caplog.text and "auto" in caplog.text
    machine.flags = frozenset({"avx512_bf16"})
    caplog.clear()
    P._warned.clear()
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        P.resolve("bf16", "cpu")
    assert not caplog.records  # native bf16: nothing to warn about


def test_explicit_fp32_warns_where_this_models_probe_found_bf16_twice_as_fast(machine, caplog):
    machine.flags = frozenset({"avx512_bf16"})
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        assert P.resolve("no", "cpu", probe=lambda: 2.3, model="big") == "no"
        assert not caplog.records  # an explicit choice never waits for a probe: nothing known yet
        assert P.resolve("auto", "cpu", probe=lambda: 2.3, model="big") == "bf16"
        assert P.resolve("auto", "cpu", probe=lambda: 1.5, model="mid") == "bf16"
        assert P.resolve("no", "cpu", probe=lambda: 0.0, model="mid") == "no" and not caplog.records  # < 2x
        assert P.resolve("no", "cpu", probe=lambda: 0.0, model="big") == "no"
    assert len(caplog.records) == 1 and "big trains 2.3x faster in bf16" in caplog.text


def test_this_machine_is_described():
    name, flags = P.cpu_description()
    assert name and isinstance(flags, frozenset)


@pytest.mark.slow
def test_training_saves_the_precision_it_used(instance_dir, tmp_path):
    from boothkit.core import config as C
    from boothkit.train.loop import run_training

    cfg = C.resolve(C.TRAIN_SECTIONS, {}, {"instance_dir": str(instance_dir), "class_noun": "dog", "prior": False,
                                             "output_dir": str(tmp_path / "o"), "max_steps": 1})
    assert cfg.train.mixed_precision == "auto"
    out = run_training(cfg, progress=False)
    assert C.load_toml(out / "config.toml")["train"]["mixed_precision"] == "no"  # tests pin auto to fp32
