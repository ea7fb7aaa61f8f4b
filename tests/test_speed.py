"""`boothkit bench speed` at CI size on the tiny model: the tables are written and hold what they say."""
import json

import pytest


@pytest.mark.slow
def test_speed_bench_writes_its_tables(tmp_path, capsys):
    from boothkit.cli import main

    out = tmp_path / "speed"
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "speed", "--model", "tiny", "--resolution", "64", "--steps", "2", "--only", "no prior",
              "--only", "without class images", "--class-images", "1", "--out", str(out)])
    assert exit_.value.code == 0
    r = json.loads((out / "speed.json").read_text())
    assert [t["config"] for t in r["training"]] == ["LoRA UNet, no prior, fp32",
                                                    "LoRA UNet, prior without class images, fp32"]
    for t in r["training"]:
        assert t["seconds_per_step"] > 0 and t["peak_mib"] > 0 and t["gflops_per_step"] > 0
        assert t["fraction_of_floor"] == pytest.approx(t["floor_seconds"] / t["seconds_per_step"])
    no_prior, with_prior = r["training"]
    assert with_prior["gflops_per_step"] == pytest.approx(2 * no_prior["gflops_per_step"], rel=0.01)  # batch 2
    assert len(r["class_images"]) == 2 and r["time_to_subject"][-1]["what"].startswith("prior without class images")
    assert "machine:" in (out / "speed.md").read_text()


def test_unknown_configuration_is_one_line(tmp_path, capsys):
    from boothkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "speed", "--model", "tiny", "--only", "fp64", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and len(err) == 1 and "--only fp64" in err[0]


def test_only_selects_by_word_or_by_whole_name():
    from boothkit.evaluate.speed import CPU_CONFIGS, select

    assert list(select(CPU_CONFIGS, ("LoRA UNet, prior, fp32",))) == ["LoRA UNet, prior, fp32"]
    assert set(select(CPU_CONFIGS, ("compiled",))) == {"LoRA UNet, prior, fp32, compiled",
                                                       "LoRA UNet, prior, bf16, compiled"}
    assert len(select(CPU_CONFIGS, ("LoRA UNet, prior, fp32", "no prior"))) == 2
    assert select(CPU_CONFIGS, ()) == CPU_CONFIGS
