"""The command line: one-line errors with exit code 2, flags documented, configs that rerun a run exactly."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from boothkit import cli
from boothkit.core import config as C
from boothkit.adapters.lora import LORA_FILE


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_train_help_documents_every_config_key(capsys):
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    for section, cls in C.TRAIN_SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert (f.metadata.get("flag") or "--" + f.name.replace("_", "-")) in out
            assert f"{section}.{f.name}" in out


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("train", "generate", "class-images", "models", "demo"):
        assert command in out


@pytest.mark.parametrize("args, needles", [
    (["train", "--rnak", "4"], ["--rnak", "--rank"]),
    (["train", "--rank", "four"], ["--rank", "four"]),
    (["train", "--mixed-precision", "fp8"], ["--mixed-precision"]),
    (["train", "--class-noun", "dog", "--output-dir", "o"], ["data.instance_dir"]),
    (["train", "--instance-dir", "/no/such/dir", "--class-noun", "dog", "--output-dir", "o"], ["/no/such/dir"]),
    (["train", "--config", "/no/such.toml"], ["/no/such.toml"]),
    (["models", "path", "stable-diffusion-v1-5/stable-diffusion-v1-5"], ["no local folder"]),  # a hub id
])
def test_bad_input_is_one_line(args, needles, capsys):
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, *needles)


def test_bad_config_key_and_value(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[lora]\nrank = 4\nranc = 8\n')
    code, _, err = run(["train", "--config", bad], capsys)
    assert_one_line_error(code, err, "lora.ranc")
    bad.write_text('[train]\nmax_steps = "many"\n')
    code, _, err = run(["train", "--config", bad], capsys)
    assert_one_line_error(code, err, "train.max_steps")


def test_unreadable_photo_named(instance_dir, tmp_path, capsys):
    (instance_dir / "scan.png").write_bytes(b"\x89PNG broken")
    code, _, err = run(["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--output-dir",
                        tmp_path / "o", "--no-prior"], capsys)
    assert_one_line_error(code, err, "scan.png", "--skip-bad-images")


def test_hub_model_unreachable_is_one_line(instance_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--output-dir",
                        tmp_path / "o", "--no-prior", "--model", "someone/not-cached-model"], capsys)
    assert_one_line_error(code, err, "someone/not-cached-model", "--model mini, mini-flow, tiny")


@pytest.mark.slow
def test_saved_config_reruns_identically_and_output_is_protected(instance_dir, tmp_path, capsys):
    first = tmp_path / "first"
    code, _, err = run(["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--output-dir", first,
                        "--no-prior", "--max-steps", 3, "--rank", 2, "--learning-rate", 1e-3], capsys)
    assert code == 0, err
    # rerunning into the same folder would destroy the first run: refused
    code, _, err = run(["train", "--config", first / "config.toml"], capsys)
    assert_one_line_error(code, err, "--output-dir", "--overwrite")
    second = tmp_path / "second"
    code, _, err = run(["train", "--config", first / "config.toml", "--output-dir", second], capsys)
    assert code == 0, err
    a, b = load_file(first / LORA_FILE), load_file(second / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--method", "full"], ["--full"]])
def test_full_fine_tune_output_names_the_model_folder(flag, instance_dir, tmp_path, capsys):
    """--method full used to print a LoRA path and a --lora hint, though a full model was written."""
    out = tmp_path / "out"
    code, printed, err = run(["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--output-dir", out,
                              "--no-prior", "--max-steps", 1, *flag], capsys)
    assert code == 0, err
    assert (out / "model" / "model_index.json").is_file() and not (out / LORA_FILE).exists()
    assert f"model: {out / 'model'}" in printed and f"--model {out / 'model'}" in printed
    assert "LoRA" not in printed and "--lora" not in printed


def test_models_path_tiny_is_a_diffusers_folder(capsys, tiny_path):
    from diffusers import StableDiffusionPipeline

    code, out, _ = run(["models", "path", "tiny"], capsys)
    assert code == 0 and out.strip() == str(tiny_path)
    pipe = StableDiffusionPipeline.from_pretrained(out.strip())
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


@pytest.mark.slow
def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "boothkit", "train", "--rank", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_help_does_not_import_torch():
    """`boothkit --help` and flag errors answer at once: heavy libraries load only when a command runs."""
    code = "import sys, boothkit.cli; print(sorted({'torch', 'diffusers', 'transformers', 'gradio'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
