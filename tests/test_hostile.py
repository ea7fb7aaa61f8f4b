"""The hostile-input catalogue (docs/errors.md): every kind of file or value a user hands boothkit, through the CLI.

Each refusal is ONE line on stderr that names the file, flag or config key, exit code 2, no traceback, and nothing
already on disk is touched. What should train does train, with a warning naming the file where one is due.
Checkpoint and --resume inputs are held by tests/test_train.py.
"""
from __future__ import annotations

import importlib
import io
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from boothkit.core import hub_ids
from boothkit import adapters as L
from boothkit.cli import main
from boothkit.mini.subjects import dataset_dir

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def run(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "File \"" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------------------- hostile files

def png_claiming(width: int, height: int) -> bytes:
    """A PNG signature and header that claim width x height pixels, with no pixel data: a decompression bomb's
    shape at 60 bytes (Pillow checks the claimed size when it opens the file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


BOMB = png_claiming(100_000, 100_000)  # 10^10 pixels: over twice Pillow's limit, so it refuses to decode it


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def odd_mode_photos(folder: Path) -> list[str]:
    """Photos in every mode a camera, scanner or editor writes; each must train as RGB. Each is another picture
    (the same one in five modes is five near-duplicates, which the photo audit rightly names)."""
    rng = np.random.default_rng(0)

    def picture():
        return Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8))

    picture().convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (80, 80))).astype(np.uint16)).save(folder / "sixteen-bit.png")
    picture().convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    picture().convert("RGBA").save(folder / "alpha.png")
    picture().convert("LA").save(folder / "grey-alpha.png")
    return ["cmyk.jpg", "sixteen-bit.png", "palette.png", "alpha.png", "grey-alpha.png"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_path) -> dict[str, Path]:
    """A good LoRA for the tiny model and the ways a LoRA file goes wrong."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("loras")
    unet = L.add_lora(UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet"), TARGETS, 2, 2.0)
    layers = L.lora_state_dict(unet)
    meta = {"unet": L.adapter_metadata(TARGETS, 2, 2.0)}
    good = L.save_lora_file(folder / "good.safetensors", {"unet": layers}, meta, {"base_model": "tiny"})
    wider = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v for k, v in layers.items()}
    files = {
        "good": good,
        "size": L.save_lora_file(folder / "size.safetensors", {"unet": wider}, meta, {"base_model": "tiny"}),
        "family": L.save_lora_file(folder / "family.safetensors", {"unet": layers}, meta,
                                   {"base_model": "tiny", "family": "sdxl"}),
        "nameless": L.save_lora_file(folder / "nameless.safetensors", {"unet": layers}, meta, {}),  # no base model
    }
    elsewhere = {k.replace("down_blocks", "far_blocks").replace("up_blocks", "far_blocks").replace("mid_block", "far_block"): v
                 for k, v in layers.items()}  # LoRA weights for layers the model does not have
    files["no layer"] = L.save_lora_file(folder / "elsewhere.safetensors", {"unet": elsewhere}, meta,
                                         {"base_model": "tiny"})
    with safe_open(str(good), "pt") as f:  # the good file with its lora_adapter_metadata cut short
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    header["lora_adapter_metadata"] = header["lora_adapter_metadata"][:20]
    save_file(tensors, folder / "metadata.safetensors", metadata=header)
    files["metadata"] = folder / "metadata.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, folder / "unknown.safetensors")
    files["unknown"] = folder / "unknown.safetensors"
    for name, data in (("truncated", good.read_bytes()[:len(good.read_bytes()) // 2]), ("empty", b""),
                       ("text", b"rank = 8\n"), ("pickle", b"\x80\x04\x95 not safetensors")):
        (folder / f"{name}.safetensors").write_bytes(data)
        files[name] = folder / f"{name}.safetensors"
    files["ckpt"] = folder / "lora.ckpt"
    files["ckpt"].write_bytes(b"\x80\x04 pickled")
    return files


def model_folder_without(tiny_path: Path, dest: Path, part: str, damage: Callable[[Path], None] | None = None) -> Path:
    """A copy of the tiny model folder (links, except the part at fault) with `part` missing or damaged."""
    dest.mkdir()
    for item in tiny_path.iterdir():
        if item.name == part and damage is not None:
            shutil.copytree(item, dest / part)
            damage(dest / part)
        elif item.name != part:
            (dest / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return dest


def truncate_weights(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])


# ------------------------------------------------------------------------------------------- the catalogue
# Each case: (name, build(tmp, ctx) -> (argv, needles)). ctx holds the fixtures a case may use.

def _train(ctx, *extra, out: Path | None = None) -> list:
    return ["train", "--instance-dir", ctx["instance"], "--class-noun", "dog", "--output-dir", out or ctx["tmp"] / "run",
            "--no-prior", "--max-steps", 1, *extra]


def _photo(name: str, data: bytes | Callable[[Path], bytes]):
    def build(ctx):
        path = ctx["instance"] / name
        path.write_bytes(data(ctx["instance"]) if callable(data) else data)
        return _train(ctx), [name, "--skip-bad-images"]
    return build


def _truncated_jpeg(folder: Path) -> bytes:
    whole = (next(iter(sorted(folder.glob("*.jpg"))))).read_bytes()
    return whole[: len(whole) // 3]


def _config(text: bytes, *needles: str):
    def build(ctx):
        path = ctx["tmp"] / "run.toml"
        path.write_bytes(text)
        return ["train", "--config", path], list(needles)
    return build


def _generate_lora(name: str, *needles: str, command: str = "generate"):
    def build(ctx):
        lora = ctx["loras"][name]
        args = {"generate": ["generate", "--lora", lora, "--model", "tiny", "--prompt", "x", "-n", 1, "--steps", 1,
                             "--out", ctx["tmp"] / "g"],
                "sweep": ["sweep", "--lora", lora, "--model", "tiny", "--prompt", "x", "-n", 1, "--steps", 1,
                          "--out", ctx["tmp"] / "s"],
                "export": ["export", "--lora", lora, "--format", "kohya", "--out", ctx["tmp"] / "k.safetensors"],
                "merged": ["export", "--lora", lora, "--format", "merged", "--model", "tiny", "--out",
                           ctx["tmp"] / "m"]}[command]
        return args, ["--lora", str(lora), *needles]
    return build


def _model(part: str, damage=None, *needles: str):
    def build(ctx):
        folder = model_folder_without(ctx["tiny"], ctx["tmp"] / "model", part, damage)
        return ["generate", "--model", folder, "--prompt", "x", "-n", 1, "--steps", 1, "--out", ctx["tmp"] / "g"], \
            ["--model", str(folder), *needles]
    return build


def _out_is_file(command: str):
    def build(ctx):
        target = ctx["tmp"] / "taken"
        target.write_text("keep me")
        args = {"train": _train(ctx, out=target),
                "generate": ["generate", "--model", "tiny", "--prompt", "x", "--out", target],
                "under": _train(ctx, out=target / "run")}[command]
        flag = "--out" if command == "generate" else "--output-dir"
        return args, [flag, str(target)]
    return build


def _export_out_is_folder(ctx):
    (ctx["tmp"] / "k.safetensors").mkdir()
    (ctx["tmp"] / "k.safetensors" / "keep").write_text("keep me")
    return ["export", "--lora", ctx["loras"]["good"], "--out", ctx["tmp"] / "k.safetensors", "--overwrite"], \
        ["--out", "is a folder"]


def _evaluate(real: str | None = None, samples: str | None = None, *extra):
    def build(ctx):
        folders = {}
        for kind, bad in (("samples", samples), ("real", real)):
            folders[kind] = ctx["tmp"] / kind
            folders[kind].mkdir()
            Image.new("RGB", (32, 32), "red").save(folders[kind] / "a.png")
            if bad:
                (folders[kind] / bad).write_bytes(BOMB)
        return ["evaluate", "--samples", folders["samples"], "--real-dir", folders["real"], "--prompt", "x",
                "--out", ctx["tmp"] / "e", "--clip-model", "tiny", "--dino-model", "tiny", *extra], \
            [bad or "", *(["too large"] if bad else [])]
    return build


def _sweep_cell_is_bomb(ctx):
    """A sweep whose finished cell holds a bomb: the contact sheet reads it (no generation: nothing is missing)."""
    cell = ctx["tmp"] / "s" / "cells" / "p00-x" / "g7.5_u1_t1"
    cell.mkdir(parents=True)
    (cell / "00-s0.png").write_bytes(BOMB)
    return ["sweep", "--lora", ctx["loras"]["good"], "--model", "tiny", "--prompt", "x", "-n", 1, "--unet-scale", 1,
            "--text-encoder-scale", 1, "--out", ctx["tmp"] / "s"], ["00-s0.png", "too large"]


CATALOGUE = [
    # subject photos
    ("photo: zero bytes", _photo("empty.jpg", b"")),
    ("photo: truncated JPEG", _photo("cut.jpg", _truncated_jpeg)),
    ("photo: not an image", _photo("noise.jpg", bytes(range(256)) * 4)),
    ("photo: text named .png", _photo("notes.png", b"these are my notes\n")),
    ("photo: decompression bomb", _photo("huge.png", BOMB)),
    # evaluate and sweep inputs read through the same reader
    ("evaluate: bomb in --real-dir", _evaluate(real="huge.png")),
    ("evaluate: bomb in --samples", _evaluate(samples="huge.png")),
    ("evaluate: free-text --device", lambda ctx: (_evaluate()(ctx)[0] + ["--device", "gpu0"], ["metrics.device",
                                                                                                  "gpu0"])),
    ("evaluate: a CUDA device this machine lacks", lambda ctx: (_evaluate()(ctx)[0] + ["--device", "cuda:99"],
                                                                ["--device cuda:99: this machine has",
                                                                 "CUDA device(s)"])),
    ("sweep: bomb among finished cells", _sweep_cell_is_bomb),
    # LoRA files
    ("lora: text file", _generate_lora("text", "not a LoRA safetensors file")),
    ("lora: zero bytes", _generate_lora("empty", "not a LoRA safetensors file")),
    ("lora: truncated", _generate_lora("truncated", "not a LoRA safetensors file")),
    ("lora: pickle bytes", _generate_lora("pickle", "not a LoRA safetensors file")),
    ("lora: a .ckpt pickle", _generate_lora("ckpt", "a pickle file, which can run code")),
    ("lora: unknown keys", _generate_lora("unknown", "model.weight")),
    ("lora: another size", _generate_lora("size", "another model family or size")),
    ("lora: another family", _generate_lora("family", "SDXL")),
    ("lora: no layer matches", _generate_lora("no layer", "none of its layers matches")),
    ("lora: damaged lora_adapter_metadata, export", _generate_lora("metadata", "lora_adapter_metadata",
                                                                   command="export")),
    ("lora: an SD LoRA on a FLUX.1 model", lambda ctx: (["generate", "--lora", ctx["loras"]["good"], "--model",
                                                        "tiny-flux", "--prompt", "x", "--out", ctx["tmp"] / "g"],
                                                       ["none of its layers matches tiny-flux"])),
    ("lora: truncated, sweep", _generate_lora("truncated", "not a LoRA", command="sweep")),
    ("lora: truncated, export", _generate_lora("truncated", "not a LoRA", command="export")),
    ("lora: unknown keys, export", _generate_lora("unknown", "not a LoRA", command="export")),
    ("lora: another size, merged export", _generate_lora("size", "another model family or size", command="merged")),
    ("lora: no base model, generate", lambda ctx: (["generate", "--lora", ctx["loras"]["nameless"], "--prompt", "x",
                                                    "--out", ctx["tmp"] / "g"], ["does not name its base model",
                                                                                 "pass --model"])),
    ("lora: no base model, sweep", lambda ctx: (["sweep", "--lora", ctx["loras"]["nameless"], "--prompt", "x",
                                                 "--out", ctx["tmp"] / "s"], ["does not name its base model",
                                                                              "pass --model"])),
    # config files
    ("config: syntax error", _config(b"[lora\nrank = 4\n", "run.toml", "invalid TOML")),
    ("config: unknown key", _config(b"[lora]\nranc = 4\n", "lora.ranc")),
    ("config: unknown section", _config(b"[loras]\nrank = 4\n", "loras")),
    ("config: wrong type", _config(b'[train]\nmax_steps = "many"\n', "train.max_steps")),
    ("config: out of range", _config(b"[lora]\ndropout = 1.5\n", "lora.dropout")),
    ("config: nan", _config(b"[train]\nlearning_rate = nan\n", "train.learning_rate")),
    ("config: not UTF-8", _config("[data]\nclass_noun = 'chien \u00e9'\n".encode("latin-1"), "run.toml", "UTF-8")),
    ("config: a folder", lambda ctx: (["train", "--config", ctx["tmp"]], [str(ctx["tmp"])])),
    ("config: a key with no effect", lambda ctx: (_train(ctx, "--mask-outside", "0.3"),
                                                  ["data.mask_outside (--mask-outside)", "add --masked-loss"])),
    # identifier, class noun and prompts
    ("value: empty identifier", lambda ctx: (_train(ctx, "--token", ""), ["data.token"])),
    ("value: whitespace class noun", lambda ctx: (_train(ctx, "--class-noun", "  "), ["data.class_noun"])),
    ("value: whitespace instance prompt", lambda ctx: (_train(ctx, "--instance-prompt", " "),
                                                       ["data.instance_prompt"])),
    ("value: empty generate prompt", lambda ctx: (["generate", "--model", "tiny", "--prompt", "", "--out",
                                                   ctx["tmp"] / "g"], ["generate.prompt"])),
    ("value: learning rate inf", lambda ctx: (_train(ctx, "--learning-rate", "inf"), ["train.learning_rate"])),
    # several subjects
    ("subjects: one identifier twice", lambda ctx: (_train(ctx, "--subject", ctx["tmp"], "SKS", "cat"),
                                                    ["data.subjects[0]", "'SKS' is already data.token's"])),
    ("subjects: one folder twice", lambda ctx: (_train(ctx, "--subject", ctx["instance"], "zwx", "cat"),
                                                ["data.subjects[0]", "is already data.token's"])),
    ("subjects: a table without token", _config(b'[[data.subjects]]\ninstance_dir = "x"\nclass_noun = "cat"\n',
                                               "data.subjects[0].token is required")),
    ("subjects: --subject with two values", lambda ctx: (_train(ctx, "--subject", ctx["tmp"], "zwx"),
                                                         ["--subject", "3 arguments"])),
    ("subjects: ti with two subjects", lambda ctx: (_train(ctx, "--method", "ti", "--subject", ctx["tmp"], "zwx",
                                                           "cat"), ["lora.method ti", "one identifier"])),
    # model folders and files
    ("model: folder without unet/", _model("unet", None, "unet/")),
    ("model: folder without tokenizer/", _model("tokenizer", None, "tokenizer/")),
    ("model: truncated weights", _model("unet", truncate_weights, "cannot load")),
    ("vae: not an AutoencoderKL", lambda ctx: (["generate", "--model", "tiny", "--vae", ctx["tiny"] / "unet",
                                                "--prompt", "x", "--out", ctx["tmp"] / "g"],
                                               ["--vae", "not a loadable AutoencoderKL"])),
    ("model: a photo as --model", lambda ctx: (["generate", "--model", ctx["instance"] / "00.jpg", "--prompt", "x",
                                         "--out", ctx["tmp"] / "g"], ["--model", "00.jpg"])),
    # output paths
    ("output: --output-dir is a file", _out_is_file("train")),
    ("output: --output-dir under a file", _out_is_file("under")),
    ("output: generate --out is a file", _out_is_file("generate")),
    ("output: export --out is a folder", _export_out_is_folder),
]


@pytest.mark.slow
@pytest.mark.parametrize("build", [c[1] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_refused_on_one_line(build, instance_dir, tmp_path, tiny_path, loras, capsys):
    ctx = {"instance": instance_dir, "tmp": tmp_path, "tiny": tiny_path, "loras": loras}
    args, needles = build(ctx)
    before = snapshot(tmp_path)
    code, _, err = run(args, capsys)
    assert_refused(code, err, *needles)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a refusal changed a file already there"


@pytest.mark.parametrize("command", ["train", "generate"])
def test_a_folder_without_write_permission_is_refused_before_any_work(command, instance_dir, tmp_path, monkeypatch,
                                                                      capsys):
    """docs/errors.md's row: checked with the permission bits' own test (os.access), which this suite patches to
    deny the folder, since root (as CI runs) may write anywhere and chmod alone would not refuse."""
    locked = tmp_path / "locked"
    locked.mkdir()
    allowed = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and allowed(p, mode, **kw))
    ctx = {"instance": instance_dir, "tmp": tmp_path}
    args, flag = {"train": (_train(ctx, out=locked / "run"), "--output-dir"),
                  "generate": (["generate", "--model", "tiny", "--prompt", "x", "--out", locked / "g"], "--out")}[command]
    code, _, err = run(args, capsys)
    assert_refused(code, err, f"{flag} {locked}", f"no permission to write in {locked}")
    assert list(locked.iterdir()) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------------------ no --model, hub ids

CHOICES = ["a hub id (" + hub_ids.SD15 + ")", "a local diffusers folder or .safetensors file",
           "mini (pretrained on emoji, to try boothkit)", "tiny (random weights, for plumbing tests)"]


@pytest.mark.usefixtures("no_default_model")
@pytest.mark.parametrize("args, key", [
    (["train", "--instance-dir", "photos", "--token", "sks", "--class-noun", "dog", "--output-dir", "run"],
     "model.model is required (--model): "),
    (["train", "--subject", "photos", "sks", "dog", "--output-dir", "run", "--no-prior"], "model.model is required"),
    (["class-images", "--class-dir", "class", "--class-noun", "dog"], "model.model is required (--model): "),
    (["generate", "--prompt", "x", "--out", "g"], "generate: give --lora (its metadata names the base model) or --model: "),
    (["bench", "dreambench", "--dataset", dataset_dir(), "--out", "bench"],
     "--train-config (not given): names no model ([model] model = ...): "),
], ids=["train", "train several subjects", "class-images", "generate without --lora", "bench dreambench"])
def test_no_model_is_refused_naming_what_to_give(args, key, tmp_path, monkeypatch, capsys):
    """No default model: without --model nothing trains the random-weight tiny model unasked."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(args, capsys)
    assert_refused(code, err, key, *CHOICES)
    assert list(tmp_path.iterdir()) == []  # nothing written


def _hub_http_error(cls: type, message: str) -> Exception:
    """huggingface_hub's own HTTP error, as it raises it (its constructor takes the HTTP library's response)."""
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    url = "https://huggingface.co/api/models/x/y/revision/main"
    return cls(message, response=http.Response(401, request=http.Request("GET", url)))


def _through_diffusers(spec: str, cause: Exception) -> OSError:
    """What diffusers raises when the hub's metadata call fails and the repository is not cached: an OSError
    raised from the hub's error, while the failed cache lookup is its context."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified "
                                          "revision on the local disk and outgoing traffic has been disabled.")
        except FileNotFoundError as lookup:
            raise OSError(f"Cannot load model {spec}: the model is not fully cached locally ({lookup}) and an error "
                          "occurred while trying to fetch metadata from the Hub.") from cause
    except OSError as exc:
        return exc


def _hub_says(kind: str, spec: str) -> Exception:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    not_found = "401 Client Error. Repository Not Found for url: https://huggingface.co/api/models/" + spec
    return {
        "not found": lambda: _hub_http_error(RepositoryNotFoundError, not_found),
        "not found, through diffusers": lambda: _through_diffusers(spec, _hub_http_error(RepositoryNotFoundError,
                                                                                          not_found)),
        "not a valid model identifier": lambda: OSError(f"{spec} is not a local folder and is not a valid model "
                                                        "identifier listed on 'https://huggingface.co/models'"),
        "offline, not cached": lambda: LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"),
        "gated": lambda: _hub_http_error(GatedRepoError, "403 Client Error. Cannot access gated repo " + spec),
    }[kind]()


def _loader_raising(monkeypatch, cls_name: str, error: Exception) -> list:
    """Replace diffusers' `cls_name`'s first hub contact (a pipeline's download, which from_pretrained makes first;
    a model's from_pretrained) with one that raises the hub's `error`; returns its calls."""
    import diffusers

    calls = []

    def load(spec, *args, **kwargs):
        calls.append(spec)
        raise error

    method = "download" if cls_name == "DiffusionPipeline" else "from_pretrained"
    monkeypatch.setattr(getattr(diffusers, cls_name), method, load)
    return calls


REMOVED = next(iter(hub_ids.REMOVED))


@pytest.mark.parametrize("kind", ["not found", "not found, through diffusers", "not a valid model identifier",
                                  "offline, not cached"])
def test_removed_hub_id_names_its_maintained_copy(kind, instance_dir, tmp_path, monkeypatch, capsys):
    """An id taken off the hub fails at once (one load, no retry) with one line naming its maintained copy."""
    calls = _loader_raising(monkeypatch, "DiffusionPipeline", _hub_says(kind, REMOVED))
    code, _, err = run(["train", "--model", REMOVED, "--instance-dir", instance_dir, "--class-noun", "dog",
                        "--output-dir", tmp_path / "run", "--no-prior", "--max-steps", 1], capsys)
    assert_refused(code, err)
    assert err.strip() == f"error: --model {REMOVED}: removed from the hub; use {hub_ids.REMOVED[REMOVED]}"
    assert err.strip() == ("error: --model runwayml/stable-diffusion-v1-5: removed from the hub; use "
                           "stable-diffusion-v1-5/stable-diffusion-v1-5")  # issue 31's wording
    assert calls == [REMOVED] and not (tmp_path / "run" / L.LORA_FILE).exists()


@pytest.mark.parametrize("kind, said", [
    ("not found", "no such repository on the hub (check the id; a private one needs hf auth login)"),
    ("not found, through diffusers", "no such repository on the hub"),
    ("not a valid model identifier", "no such repository on the hub"),
    ("offline, not cached", "not in the local hub cache, and the hub cannot be reached (offline); pass a local "
                            "diffusers folder or .safetensors file, or a built-in model (--model mini, mini-flow, tiny)"),
    ("gated", "a gated repository on the hub; accept its terms at https://huggingface.co/someone/no-such-model and "
              "log in (hf auth login)"),
])
def test_hub_id_the_hub_lacks_is_one_line(kind, said, tmp_path, monkeypatch, capsys):
    calls = _loader_raising(monkeypatch, "DiffusionPipeline", _hub_says(kind, "someone/no-such-model"))
    code, _, err = run(["generate", "--model", "someone/no-such-model", "--prompt", "x", "--out", tmp_path / "g"],
                       capsys)
    assert_refused(code, err, f"--model someone/no-such-model: {said}")
    assert calls == ["someone/no-such-model"] and not (tmp_path / "g").exists()


def test_removed_hub_id_as_vae_names_its_maintained_copy(tmp_path, monkeypatch, capsys):
    _loader_raising(monkeypatch, "AutoencoderKL", _hub_says("not found, through diffusers", REMOVED))
    code, _, err = run(["generate", "--model", "tiny", "--vae", REMOVED, "--prompt", "x", "--out", tmp_path / "g"],
                       capsys)
    assert_refused(code, err, f"--vae {REMOVED}: removed from the hub; use {hub_ids.REMOVED[REMOVED]}")


# ---------------------------------------------------------------------------------------- what trains

@pytest.mark.slow
def test_odd_photos_train_with_named_warnings(instance_dir, tmp_path, capsys, caplog):
    """Every mode trains; a tiny photo trains with a warning naming it; with --skip-bad-images a bomb is skipped
    by name."""
    modes = odd_mode_photos(instance_dir)
    Image.new("RGB", (4, 4), "blue").save(instance_dir / "tiny.png")
    (instance_dir / "huge.png").write_bytes(BOMB)
    out = tmp_path / "run"
    code, _, err = run(["train", "--instance-dir", instance_dir, "--class-noun", "dog", "--output-dir", out,
                        "--no-prior", "--max-steps", 1, "--rank", 2, "--skip-bad-images"], capsys)
    assert code == 0, err
    assert (out / L.LORA_FILE).is_file()
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert any("skipping" in w and "huge.png" in w and "too large" in w for w in warnings), err
    assert any("tiny.png" in w and "4x4" in w for w in warnings), err
    assert not any(m in w for m in modes for w in warnings), err
    assert "Traceback" not in err


@pytest.mark.parametrize("key, value", [("validation_prompts", ["{tokn} on a beach"]),
                                        ("instance_prompt", "a photo of {tokne} dog"),
                                        ("class_prompt", "a {token} dog")])  # class images have no identifier
def test_unknown_template_field_warns_when_the_config_is_read(key, value, caplog):
    """A typo'd {field} is named as the config is read, not found in the validation pictures hours later; it is
    not refused, since braces are emphasis in some prompt dialects."""
    from boothkit.core import config as C

    C.resolve(C.TRAIN_SECTIONS, {}, {"instance_dir": "p", "class_noun": "dog", "output_dir": "o", key: value})
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(key in m and "is not a field" in m for m in messages), messages


def test_long_prompt_warns_naming_the_flag(tmp_path, capsys):
    """CLIP reads 77 tokens and drops the rest silently: boothkit says so, naming the flag, and still generates."""
    long_prompt = " ".join(["a photo of a dog on a beach"] * 15)
    code, out, err = run(["generate", "--model", "tiny", "--prompt", long_prompt, "-n", 1, "--steps", 1,
                          "--out", tmp_path / "g"], capsys)
    assert code == 0, err
    assert any(line.startswith("WARNING: --prompt") and "tokens" in line for line in err.splitlines()), err
    assert "wrote 1 images" in out


def test_huge_but_allowed_image_is_read_with_a_named_warning(tmp_path, monkeypatch, caplog):
    """Between Pillow's limit and twice it, Pillow only warns: boothkit reads the image and names it."""
    from boothkit.train.data import load_image

    Image.new("RGB", (40, 40), "red").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    assert load_image(tmp_path / "big.png").size == (40, 40)
    assert any("big.png" in r.getMessage() and "guard" in r.getMessage() for r in caplog.records)


def test_bomb_in_class_folder_is_ignored_by_name(tmp_path, caplog):
    """Class-image folders are read with the same reader: a bomb there is left out with a warning naming it."""
    from boothkit.train.prior import valid_images

    Image.new("RGB", (16, 16), "red").save(tmp_path / "class-00000.png")
    (tmp_path / "class-00001.png").write_bytes(BOMB)
    assert [p.name for p in valid_images(tmp_path)] == ["class-00000.png"]
    assert any("class-00001.png" in r.getMessage() for r in caplog.records)


@pytest.fixture
def hub_env():
    """The offline variables as the test sets them, restored (with huggingface_hub's flag) afterwards."""
    saved = {k: os.environ.get(k) for k in hub_ids.OFFLINE_ENV}
    for k in hub_ids.OFFLINE_ENV:
        os.environ.pop(k, None)
    yield os.environ
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    hub_ids.apply_offline()


@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE set after import", "TRANSFORMERS_OFFLINE"])
def test_offline_a_hub_id_not_cached_fails_at_once_without_the_network(how, hub_env, tmp_path, monkeypatch, capsys):
    """Issue 28: offline mode honoured wherever it is set (huggingface_hub reads its variable only at import), and
    a model that is not cached fails with the one line that names it; no connection is even tried."""
    import socket

    tried = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: tried.append(a) or (_ for _ in ()).throw(
        OSError("the network was asked")))
    flags = ["--offline"] if how == "--offline" else []
    if how != "--offline":
        hub_env["HF_HUB_OFFLINE" if how.startswith("HF_") else "TRANSFORMERS_OFFLINE"] = "1"
    spec = "someone/a-model-nobody-cached"
    code, _, err = run([*flags, "generate", "--model", spec, "--prompt", "x", "--out", tmp_path / "g"], capsys)
    assert_refused(code, err, f"--model {spec}: not in the local hub cache, and the hub cannot be reached (offline)")
    assert tried == [] and not (tmp_path / "g").exists()
