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
        return lambda: calls.append(value) or P.Timings(1.0, 1.0 / value)

    assert P.resolve("auto", "cpu", probe=probe(0.4), model="small") == "no"
    assert P.resolve("auto", "cpu", probe=probe(1.7), model="big") == "bf16"
    assert P.resolve("auto", "cpu", probe=probe(0.1), model="big") == "bf16" and calls == [0.4, 1.7]  # cached
    machine.flags = frozenset()
    assert P.resolve("auto", "cpu", probe=probe(9.0), model="other") == "no" and 9.0 not in calls
    unet = load_pipeline("tiny").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    timings = P.step_timings(unet, SD.probe_forward(unet, 64))
    assert timings.fp32_s > 0 and timings.bf16_s > 0
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
        assert P.resolve("no", "cpu", probe=lambda: P.Timings(2.3, 1.0), model="big") == "no"
        assert not caplog.records  # an explicit choice never waits for a probe: nothing known yet
        assert P.resolve("auto", "cpu", probe=lambda: P.Timings(2.3, 1.0), model="big") == "bf16"
        assert P.resolve("auto", "cpu", probe=lambda: P.Timings(1.5, 1.0), model="mid") == "bf16"
        assert P.resolve("no", "cpu", probe=lambda: P.Timings(1.0, 1.0), model="mid") == "no" and not caplog.records  # < 2x
        assert P.resolve("no", "cpu", probe=lambda: P.Timings(1.0, 1.0), model="big") == "no"
    assert len(caplog.records) == 1 and "big trains 2.3x faster in bf16" in caplog.text


def test_auto_logs_both_timings_and_probes_again_for_a_new_torch_a_changed_model_or_an_old_entry(
        machine, monkeypatch, caplog):
    machine.flags = frozenset({"avx512_bf16"})
    probes = []

    def probe(fp32_s, bf16_s):
        return lambda: probes.append((fp32_s, bf16_s)) or P.Timings(fp32_s, bf16_s)

    with caplog.at_level(logging.INFO, logger="boothkit"):
        assert P.resolve("auto", "cpu", probe=probe(0.32, 0.20), model="m abc") == "bf16"
    assert "fp32 320.0 ms, bf16 200.0 ms: 1.60x" in caplog.text and "bf16 needs 1.5x" in caplog.text
    assert P.resolve("auto", "cpu", probe=probe(9, 1), model="m abc") == "bf16" and len(probes) == 1  # cached
    # within the margin: a gain a busy machine's noise could give keeps fp32
    assert P.resolve("auto", "cpu", probe=probe(0.22, 0.20), model="m other-architecture") == "no"
    monkeypatch.setattr(P.torch, "__version__", "9.9.9")
    assert P.resolve("auto", "cpu", probe=probe(0.10, 0.20), model="m abc") == "no" and len(probes) == 3
    path = P.Path(P.os.environ["BOOTHKIT_HOME"]) / "precision.json"
    cache = P.json.loads(path.read_text())
    cache[P._key("train old")] = 2.5  # a speedup alone, as boothkit cached it before it kept timings
    path.write_text(P.json.dumps(cache))
    assert P.resolve("auto", "cpu", probe=probe(0.10, 0.20), model="old") == "no" and len(probes) == 4


def test_the_architecture_digest_follows_the_config(tmp_path):
    from boothkit.models.loading import architecture_digest

    (tmp_path / "unet").mkdir()
    assert architecture_digest(str(tmp_path), "unet") == ""  # nothing on disk to hash
    (tmp_path / "unet" / "config.json").write_text('{"layers": 2}')
    two = architecture_digest(str(tmp_path), "unet")
    (tmp_path / "unet" / "config.json").write_text('{"layers": 3}')
    assert two and architecture_digest(str(tmp_path), "unet") not in ("", two)
    assert architecture_digest("tiny", "unet") == architecture_digest("tiny", "unet") != ""


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
