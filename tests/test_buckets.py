"""Aspect-ratio buckets (--buckets): the bucket list, each photo's bucket and crop, one bucket per batch, the
class half's own pass, and bit-identical cached, uncached and resumed runs on the tiny model at 256 px (buckets
192x320, 256x256, 320x192)."""
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.train.batches import Batch, LatentBank, draw_batch
from boothkit.cli import main
from boothkit.train.data import aspect_buckets, nearest_bucket
from boothkit.models.families import SD, Conditioning
from boothkit.train.objectives import DiffusionObjective
from boothkit.adapters.lora import LORA_FILE
from boothkit.train.losses import add_noise
from boothkit.train.loop import run_training, training_step

pytestmark = pytest.mark.usefixtures("one_thread")
B256 = [(192, 320), (256, 256), (320, 192)]


class Vae(torch.nn.Module):
    """Posterior mean 0, std 1 on the 8x-downsampled grid: the latents' shape shows the picture's extent."""
    config = type("cfg", (), {"scaling_factor": 1.0, "shift_factor": None})()
    dtype = torch.float32


def fake_bank(images, **kw):
    bank = LatentBank(images, 256, Vae(), prompts=["s"] * len(images), cache=False, flip=False, random_crop=False,
                      device="cpu", buckets=B256, **kw)
    bank._encode = lambda px: (torch.zeros(len(px), 4, px.shape[2] // 8, px.shape[3] // 8),
                               torch.ones(len(px), 4, px.shape[2] // 8, px.shape[3] // 8))
    return bank


def test_bucket_lists_at_512_and_1024():
    assert aspect_buckets(512) == [(320, 768), (320, 704), (384, 640), (448, 576), (512, 512), (576, 448),
                                   (640, 384), (704, 320), (768, 320)]
    xl = aspect_buckets(1024)
    # width w gets the tallest multiple of 64 with w * h <= 1024²: 640 -> 1600 (2.5:1), 1216 -> 832, 1088 -> 960
    assert len(xl) == 19 and xl[0] == (640, 1600) and xl[-1] == (1600, 640) and (1024, 1024) in xl
    assert {(1216, 832), (832, 1216), (1088, 960), (1344, 768)} <= set(xl) and (576, 1792) not in xl  # 3.1:1
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 ** 2 for w, h in xl)
    assert aspect_buckets(256) == B256


def test_each_photo_gets_the_bucket_nearest_its_aspect():
    xl = aspect_buckets(1024)
    assert nearest_bucket((3000, 2000), xl) == (1216, 832)  # 3:2 -> 1.46
    assert nearest_bucket((2000, 3000), xl) == (832, 1216)
    assert nearest_bucket((777, 777), xl) == (1024, 1024)
    assert nearest_bucket((5000, 500), xl) == (1600, 640)  # beyond 2.5:1: the widest
    assert nearest_bucket((3000, 2000), aspect_buckets(512)) == (640, 384)


def test_a_photo_keeps_all_but_a_few_pixels_and_the_conditioning_names_its_bucket():
    wide, tall = Image.new("RGB", (503, 300)), Image.new("RGB", (300, 500))
    bank = fake_bank([wide, tall])
    assert [im.size for im in bank.images] == [(322, 192), (192, 320)]  # resized to cover 320x192 / 192x320
    lat, ids, _ = bank.draw(torch.tensor([0]), torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 24, 40)  # the latent covers 320 of the 322 columns and every row
    assert ids.tolist() == [[300, 503, 0, 1, 192, 320]]  # SDXL: original size, crop top-left, the bucket
    lat, ids, _ = bank.draw(torch.tensor([1]), torch.Generator().manual_seed(0))
    assert lat.shape == (1, 4, 40, 24) and ids.tolist() == [[500, 300, 0, 0, 320, 192]]


def test_a_batch_comes_from_one_bucket_chosen_by_its_share_of_photos():
    bank = fake_bank([Image.new("RGB", (500, 300))] * 2 + [Image.new("RGB", (300, 500))])
    wide = 0
    for seed in range(300):
        idx = bank.pick(3, torch.Generator().manual_seed(seed))
        assert len({bank.targets[i] for i in idx.tolist()}) == 1
        wide += bank.targets[int(idx[0])] == (320, 192)
    assert wide / 300 == pytest.approx(2 / 3, abs=0.07)


def test_masks_follow_photos_into_their_bucket():
    mask = Image.new("L", (500, 300))
    mask.paste(255, (0, 0, 250, 300))  # the left half
    bank = fake_bank([Image.new("RGB", (500, 300))], masks=[mask])
    batch = draw_batch(torch.Generator().manual_seed(0), bank, 2, None)
    assert batch.masks.shape == (2, 1, 24, 40)
    assert batch.masks[..., :19].min() > 0.95 and batch.masks[..., 21:].max() < 0.05


class PointwiseUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, noisy, t, encoder_hidden_states):
        self.shapes.append(tuple(noisy.shape))
        return type("Out", (), {"sample": noisy * 0.5})()


def test_the_square_class_half_takes_its_own_pass_and_the_loss_is_each_halfs_mean():
    g = torch.Generator().manual_seed(1)
    subject, classes = torch.randn(2, 4, 24, 40, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    alphas, unet = torch.linspace(0.999, 0.01, 1000), PointwiseUNet()
    batch = Batch((subject, classes), ["s", "s", "c", "c"], None, None)
    encode = lambda p: Conditioning(torch.zeros(len(p), 77, 8), None)  # noqa: E731
    objective = DiffusionObjective(alphas, "epsilon")
    loss, inst, prior = training_step(SD, unet, encode, batch, objective, 0.5, torch.Generator().manual_seed(2))
    assert unet.shapes == [(2, 4, 24, 40), (2, 4, 32, 32)]
    g = torch.Generator().manual_seed(2)  # the step's draws, in its order
    noises = [torch.randn(subject.shape, generator=g), torch.randn(classes.shape, generator=g)]
    t = torch.randint(0, 1000, (4,), generator=g)
    err = [((add_noise(x, e, alphas, ts) * 0.5 - e) ** 2).flatten(1).mean(1)
           for x, e, ts in zip((subject, classes), noises, t.split(2))]
    torch.testing.assert_close(inst, err[0].mean())
    torch.testing.assert_close(prior, err[1].mean())
    torch.testing.assert_close(loss, inst + 0.5 * prior)
    seen = []  # --prior-target frozen: the frozen model sees the class pass's noisy latents only
    frozen = lambda noisy, ts, prompts, ids: seen.append((noisy.shape, prompts)) or torch.zeros_like(noisy)  # noqa: E731
    _, _, prior = training_step(SD, unet, encode, batch, objective, 0.5, torch.Generator().manual_seed(2), frozen)
    noisy = add_noise(classes, noises[1], alphas, t[2:])
    assert seen == [((2, 4, 32, 32), ["c", "c"])]
    torch.testing.assert_close(prior, ((noisy * 0.5) ** 2).mean())


def test_buckets_with_random_crop_is_one_line_naming_the_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--instance-dir", str(tmp_path), "--class-noun", "dog", "--output-dir", str(tmp_path / "o"),
              "--buckets", "--crop", "random"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --buckets") and "--crop random" in err and "\n" not in err


# --------------------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two wide photos and one tall one, with masks."""
    d = tmp_path_factory.mktemp("bucketed")
    for i, size in enumerate([(480, 290), (600, 360), (300, 500)]):
        Image.effect_noise(size, 40 + 20 * i).convert("RGB").save(d / f"{i}.png")
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, size[0] // 2 + 5, size[1]))
        mask.save(d / f"{i}.mask.png")
    return d


def cfg(photos, out, **over):
    values = {"instance_dir": str(photos), "class_noun": "dog", "output_dir": str(out), "max_steps": 4,
              "resolution": 256, "buckets": True, "flip": True, "masked_loss": True, "batch_size": 2, "rank": 4,
              "learning_rate": 1e-3, "num_class_images": 2, "class_steps": 1, "class_dir": str(photos.parent / "cls"),
              "checkpoint_every": 2, "checkpoints_keep": 5}
    return C.resolve(C.TRAIN_SECTIONS, {}, {**values, **over})


def weights(out):
    return load_file(out / LORA_FILE)


@pytest.mark.slow
def test_cached_uncached_and_resumed_runs_are_bit_identical(photos, tmp_path, monkeypatch, caplog):
    import boothkit.train.loop as T

    shapes, real = [], T.training_step
    monkeypatch.setattr(T, "training_step", lambda f, u, e, batch, *a, **k: shapes.append(
        [tuple(x.shape) for x in batch.latents]) or real(f, u, e, batch, *a, **k))
    cached = run_training(cfg(photos, tmp_path / "cached"), progress=False)
    assert {s[0][2:] for s in shapes} <= {(24, 40), (40, 24)} and all(s[1][2:] == (32, 32) for s in shapes)
    uncached = run_training(cfg(photos, tmp_path / "uncached", cache_latents=False), progress=False)
    a, b = weights(cached), weights(uncached)
    assert all(torch.equal(a[k], b[k]) for k in a), "cached and uncached bucketed runs differ"
    assert [c.name for c in (cached / "checkpoints").iterdir()] == ["step-0000002"]  # resume from step 2
    resumed = weights(run_training(cfg(photos, cached, resume=True), progress=False))
    assert "resuming from" in caplog.text and all(torch.equal(a[k], resumed[k]) for k in a), "resume differs"
    square = weights(run_training(cfg(photos, tmp_path / "square", buckets=False), progress=False))
    assert any(not torch.equal(a[k], square[k]) for k in a)


@pytest.mark.slow
def test_sdxl_trains_on_the_buckets_size(photos, tmp_path, monkeypatch):
    import boothkit.train.loop as T

    ids, real = [], T.training_step
    monkeypatch.setattr(T, "training_step", lambda f, u, e, batch, *a, **k: ids.append(batch.time_ids) or real(
        f, u, e, batch, *a, **k))
    run_training(cfg(photos, tmp_path / "xl", model="tiny-xl", prior=False, max_steps=3, masked_loss=False),
                 progress=False)
    rows = torch.cat(ids).tolist()
    assert {tuple(r[4:]) for r in rows} <= {(192.0, 320.0), (320.0, 192.0)}
    assert all(math.isclose(r[4] * r[5], 192 * 320) for r in rows)
