"""The training extras (min-SNR-γ, offset noise, EMA, captions, caption dropout, masked loss) and the identifier
tools, each on the tiny model or against a hand computation."""
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from boothkit.core import config as C
from boothkit.models import tokens as TK
from boothkit.train.batches import Batch, LatentBank, PromptEncoder, draw_batch
from boothkit.cli import main
from boothkit.core.errors import BoothkitError, ConfigError, DataError
from boothkit.models.families import SD, Conditioning
from boothkit.train.objectives import DiffusionObjective
from boothkit.adapters.lora import LORA_FILE
from boothkit.train.loop import run_training, training_step

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(instance_dir, out, **over):
    values = {"instance_dir": str(instance_dir), "class_noun": "dog", "output_dir": str(out), "max_steps": 4,
              "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "prior": False}
    values.update(over)
    return C.resolve(C.TRAIN_SECTIONS, {}, values)


def lora(out):
    return load_file(Path(out) / LORA_FILE)


def first_losses(monkeypatch):
    """Record every training_step's (loss, instance_loss, prior_loss) as floats, and its keyword arguments."""
    import boothkit.train.loop as T

    seen, real = [], T.training_step

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(([float(x.detach()) for x in out], {**k, "objective": a[4]}))
        return out

    monkeypatch.setattr(T, "training_step", spy)
    return seen


class PointwiseUNet(torch.nn.Module):
    """Each output pixel depends on its own input pixel only, so the loss's masking can be seen exactly."""

    def forward(self, noisy, t, encoder_hidden_states):
        return type("Out", (), {"sample": noisy * 0.5})()


def encode(prompts):
    return Conditioning(torch.zeros(len(prompts), 77, 8), None)


ALPHAS = torch.linspace(0.999, 0.01, 1000)


# ------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("over, needle", [
    ({"snr_gamma": 0.0}, "--snr-gamma"), ({"snr_gamma": -1.0}, "--snr-gamma"),
    ({"ema_decay": 1.0}, "--ema-decay"), ({"ema_decay": 0.0}, "--ema-decay"),
    ({"ema_on_cpu": True}, "--ema-on-cpu"), ({"caption_dropout": 1.5}, "data.caption_dropout"),
    ({"noise_offset": -0.1}, "train.noise_offset"),
])
def test_bad_settings_name_their_flag(over, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        make_cfg(tmp_path, tmp_path / "o", **over)


def test_extras_come_from_toml_and_default_off(tmp_path):
    cfg = C.resolve(C.TRAIN_SECTIONS, {"train": {"snr_gamma": 5, "noise_offset": 0.05, "ema_decay": 0.999},
                                       "data": {"captions": True, "caption_dropout": 0.1, "masked_loss": True}},
                    {"instance_dir": "x", "class_noun": "dog", "output_dir": str(tmp_path)})
    assert (cfg.train.snr_gamma, cfg.train.noise_offset, cfg.train.ema_decay) == (5.0, 0.05, 0.999)
    assert cfg.data.captions and cfg.data.caption_dropout == 0.1 and cfg.data.masked_loss
    off = make_cfg(tmp_path, tmp_path / "o")
    assert (off.train.snr_gamma, off.train.noise_offset, off.train.ema_decay, off.data.captions,
            off.data.caption_dropout, off.data.masked_loss) == (None, 0.0, None, False, 0.0, False)


# --------------------------------------------------------------------------------- min-SNR, offset noise

def test_min_snr_weights_each_example_of_both_halves():
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents, ["s", "s", "c", "c"])
    loss, inst, prior = training_step(SD, PointwiseUNet(), encode, batch, DiffusionObjective(ALPHAS, "epsilon", 2.0),
                                      0.5, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # replay the step's draws
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    a = ALPHAS[t]
    noisy = a.sqrt().view(-1, 1, 1, 1) * latents + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    err = ((noisy * 0.5 - noise) ** 2).flatten(1).mean(1)
    snr = a / (1 - a)
    w = torch.minimum(snr, torch.tensor(2.0)) / snr
    assert inst.item() == pytest.approx((w[:2] * err[:2]).mean().item(), rel=1e-5)
    assert prior.item() == pytest.approx((w[2:] * err[2:]).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(inst.item() + 0.5 * prior.item(), rel=1e-6)
    assert not (w == 1).all(), "some timesteps have SNR above γ: the weights are not all 1"


def test_offset_noise_is_a_per_channel_constant_from_the_step_generator():
    seen = []

    class Spy(PointwiseUNet):
        def forward(self, noisy, t, encoder_hidden_states):
            seen.append(noisy)
            return super().forward(noisy, t, encoder_hidden_states)

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    losses = [training_step(SD, Spy(), encode, Batch(latents, ["a", "b"]), DiffusionObjective(ALPHAS, "epsilon"), None,
                            torch.Generator().manual_seed(4), **k)[0].item()
              for k in ({}, {"noise_offset": 0.0}, {"noise_offset": 0.1})]
    assert losses[0] == losses[1] != losses[2]
    diff = seen[2] - seen[0]  # sqrt(1 - ᾱ_t) · 0.1 · c[b, ch]: constant over each channel's pixels
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-6) and diff.abs().max() > 1e-3


@pytest.mark.slow
def test_offset_noise_and_min_snr_in_a_run(instance_dir, tmp_path, monkeypatch):
    seen = first_losses(monkeypatch)
    for i, over in enumerate(({}, {"noise_offset": 0.0}, {"noise_offset": 0.05}, {"snr_gamma": 5.0})):
        run_training(make_cfg(instance_dir, tmp_path / f"o{i}", max_steps=1, **over), progress=False)
    (plain, _), (zero, _), (offset, k_offset), (_, k_snr) = seen
    assert plain == zero, "--noise-offset 0 repeats a run without it exactly"
    assert offset != plain and k_offset["noise_offset"] == 0.05
    assert k_snr["objective"].snr_gamma == 5.0  # its effect on the loss: test_min_snr_weights_each_example_of_both_halves


# ------------------------------------------------------------------------------------------------- EMA

@pytest.mark.slow
def test_ema_is_saved_and_equals_a_manual_ema_of_the_steps(instance_dir, tmp_path):
    decay = 0.2  # low enough that the cap min(decay, (1 + n) / (10 + n)) binds from the third step on
    raw = [lora(run_training(make_cfg(instance_dir, tmp_path / f"raw{n}", max_steps=n), progress=False))
           for n in (1, 2, 3, 4)]
    saved = lora(run_training(make_cfg(instance_dir, tmp_path / "ema", ema_decay=decay), progress=False))
    manual = dict(raw[0])
    for n, w in enumerate(raw[1:], start=1):  # EMAModel: no averaging at its first update, then d_n
        d = min(decay, (1 + n) / (10 + n))
        manual = {k: d * manual[k] + (1 - d) * w[k] for k in w}
    assert saved.keys() == manual.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], manual[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(saved[k], raw[-1][k]) for k in saved if "lora_B" in k), "EMA differs from raw"


@pytest.mark.slow
def test_resume_with_ema_is_bit_identical(instance_dir, tmp_path):
    out = tmp_path / "out"
    cfg = dict(ema_decay=0.9, ema_on_cpu=True, checkpoint_every=2, checkpoints_keep=5, max_steps=5)
    first = lora(run_training(make_cfg(instance_dir, out, **cfg), progress=False))
    shutil.rmtree(out / "checkpoints" / "step-0000004")  # resume from step 2: steps 3-5 again
    again = lora(run_training(make_cfg(instance_dir, out, resume=True, **cfg), progress=False))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    plain = tmp_path / "plain"
    run_training(make_cfg(instance_dir, plain, checkpoint_every=2, max_steps=3), progress=False)
    with pytest.raises(BoothkitError, match=r"does not match this config \(train.ema_decay: 'off' in the checkpoint"):
        run_training(make_cfg(instance_dir, plain, resume=True, ema_decay=0.9, checkpoint_every=2, max_steps=3),
                     progress=False)


# --------------------------------------------------------------------------------------------- captions

def spy_prompts(monkeypatch):
    """Prompts the text encoder is asked for during training, and the prompts the encoder was built with."""
    asked, built, real_call, real_init = [], [], PromptEncoder.__call__, PromptEncoder.__init__

    def init(self, family, tokenizers, text_encoders, prompts, *a, **k):
        built.extend(prompts)
        real_init(self, family, tokenizers, text_encoders, prompts, *a, **k)

    def call(self, prompts):
        asked.extend(prompts)
        return real_call(self, prompts)

    monkeypatch.setattr(PromptEncoder, "__init__", init)
    monkeypatch.setattr(PromptEncoder, "__call__", call)
    return asked, built


@pytest.mark.slow
def test_captions_reach_the_text_encoder(instance_dir, tmp_path, monkeypatch, caplog):
    photos = sorted(instance_dir.glob("*.jpg"))
    (instance_dir / f"{photos[0].stem}.txt").write_text("a photo of {token} {class_noun}\n on a beach")
    (instance_dir / f"{photos[1].stem}.txt").write_text("SKS dog asleep")
    asked, built = spy_prompts(monkeypatch)
    run_training(make_cfg(instance_dir, tmp_path / "o", captions=True, max_steps=12), progress=False)
    expected = {"a photo of sks dog on a beach", "SKS dog asleep", "a photo of sks dog"}  # the third has no .txt
    assert set(asked) == expected and set(built) >= expected
    assert f"1 of 3 photos have no NAME.txt beside them ({photos[2].name}); they get the instance prompt" in caplog.text


@pytest.mark.parametrize("flag, name", [("--captions", "NAME.txt"), ("--masked-loss", "NAME.mask.png")])
def test_no_sidecar_beside_any_photo_is_refused(instance_dir, tmp_path, capsys, flag, name):
    with pytest.raises(SystemExit):
        main(["train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--output-dir",
              str(tmp_path / "o"), flag, "--no-prior"])
    assert capsys.readouterr().err.strip() == f"error: {flag}: no {name} beside any photo in {instance_dir}"


@pytest.mark.slow
def test_caption_dropout_rate_and_empty_prompt(instance_dir, tmp_path, monkeypatch):
    class Bank:
        def __init__(self, prompts=("x", "x", "x")):
            self.prompts = list(prompts)

        def __len__(self):
            return 3

        def pick(self, n, g):
            return torch.randint(3, (n,), generator=g)

        def draw(self, idx, g):
            return torch.zeros(len(idx), 4, 8, 8), torch.zeros(len(idx), 6), None

    g = torch.Generator().manual_seed(0)
    prompts = [p for _ in range(20) for p in draw_batch(g, Bank(["a", "b", "c"]), 100, None, 0.3).prompts]
    assert sum(p == "" for p in prompts) / len(prompts) == pytest.approx(0.3, abs=0.03)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert draw_batch(g1, Bank(), 8, None).prompts == draw_batch(g2, Bank(), 8, None, 0.0).prompts
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2)), "no dropout: no extra draw"
    asked, built = spy_prompts(monkeypatch)
    run_training(make_cfg(instance_dir, tmp_path / "o", caption_dropout=0.5, max_steps=6), progress=False)
    assert "" in built and set(asked) == {"", "a photo of sks dog"}


@pytest.mark.parametrize("content, needle", [
    (b"a photo of a dog on a beach", "does not name the subject"),
    (b"a photo of sksy dog", "does not name the subject"),
    (b"\xff\xfe a photo of sks dog \x80", "not UTF-8"),
    (b"  \n ", "empty caption"),
])
def test_bad_captions_are_one_line_naming_the_file(instance_dir, tmp_path, capsys, content, needle):
    bad = instance_dir / f"{sorted(instance_dir.glob('*.jpg'))[0].stem}.txt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--output-dir",
              str(tmp_path / "o"), "--captions", "--no-prior"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and str(bad) in err[0] and needle in err[0], err


# ---------------------------------------------------------------------------------------------- masks

def test_a_mask_follows_its_picture_through_resize_crop_and_flip():
    class Vae(torch.nn.Module):
        config = type("cfg", (), {"scaling_factor": 1.0, "shift_factor": None})()
        dtype = torch.float32

    wide = Image.new("RGB", (256, 128))  # resized to 128 x 64; the centre crop is columns 32-95
    mask = Image.new("L", (256, 128))
    mask.paste(255, (0, 0, 128, 128))  # the left half: columns 32-63 of the crop, the left half of the latents
    bank = LatentBank([wide], 64, Vae(), prompts=["x"], cache=False, flip=True, random_crop=False, device="cpu", masks=[mask])
    bank._encode = lambda px: (torch.zeros(len(px), 4, 8, 8), torch.ones(len(px), 4, 8, 8))
    g = torch.Generator().manual_seed(3)
    flips = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5  # the bank's first draw
    _, _, masks = bank.draw(torch.zeros(16, dtype=torch.long), g)
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1.0
    for m, flipped in zip(masks, flips.tolist()):
        torch.testing.assert_close(m, left.flip(-1) if flipped else left, rtol=0, atol=0.02)  # resampled edge
    assert 0 < flips.sum() < 16


def test_masked_loss_ignores_subject_pixels_outside_the_mask_only():
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    masks = torch.ones(4, 1, 8, 8)
    masks[:2, ..., 4:] = 0.0  # subject examples: the right half is ignored
    changed = latents.clone()
    changed[:2, ..., 4:] += 3.0  # outside the subject masks
    classes = latents.clone()
    classes[2:, ..., 4:] += 3.0  # the same pixels of the class examples, which are not masked

    def loss(x):
        return training_step(SD, PointwiseUNet(), encode, Batch(x, ["s", "s", "c", "c"], None, masks),
                             DiffusionObjective(ALPHAS, "epsilon"), 1.0, torch.Generator().manual_seed(7))

    base, same, moved = loss(latents), loss(changed), loss(classes)
    assert [x.item() for x in base] == [x.item() for x in same]
    assert moved[2].item() != base[2].item() and moved[1].item() == base[1].item()


def write_masks(instance_dir, size=None, fill=255):
    for p in sorted(instance_dir.glob("*.jpg")):
        with Image.open(p) as img:
            m = Image.new("L", size or img.size)
        m.paste(fill, (0, 0, m.width // 2, m.height))
        m.save(p.with_name(p.stem + ".mask.png"))


@pytest.mark.slow
def test_masked_run_trains_and_masks_are_not_photos(instance_dir, tmp_path):
    from boothkit.train.data import load_folder

    write_masks(instance_dir)
    assert len(load_folder(instance_dir)) == 3
    masked = lora(run_training(make_cfg(instance_dir, tmp_path / "m", masked_loss=True), progress=False))
    plain = lora(run_training(make_cfg(instance_dir, tmp_path / "p"), progress=False))
    assert any(not torch.equal(masked[k], plain[k]) for k in masked)


@pytest.mark.parametrize("size, fill, needle", [((10, 10), 255, "a mask must have its photo's size"),
                                                (None, 0, "all black")])
def test_bad_masks_name_the_file(instance_dir, tmp_path, size, fill, needle):
    write_masks(instance_dir, size, fill)
    with pytest.raises(DataError, match=needle) as exc:
        run_training(make_cfg(instance_dir, tmp_path / "o", masked_loss=True), progress=False)
    assert ".mask.png" in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------- identifiers

@pytest.fixture(scope="module")
def tokenizer():
    return TK.load_tokenizer("tiny")


def test_token_check(tokenizer):
    ktn = TK.check(tokenizer, "[ktn]")
    assert [p for p, _ in ktn.pieces] == ["[", "k", "tn", "]"] and not ktn.single and ktn.verdict.startswith("avoid")
    sks = TK.check(tokenizer, "sks")
    assert sks.pieces == [("sks", 48136)] and sks.rarity == "rare" and sks.verdict.startswith("good")
    dog = TK.check(tokenizer, "dog")
    assert dog.single and dog.rarity == "common" and "common word" in dog.verdict
    assert TK.check(tokenizer, "zebra").rarity == "uncommon"


def test_token_suggest_is_seeded_rare_and_single(tokenizer):
    five = TK.suggest(tokenizer, 5, seed=0)
    assert five == TK.suggest(tokenizer, 5, seed=0) != TK.suggest(tokenizer, 5, seed=1)
    for word, i in five:
        assert word.isalpha() and len(word) <= 3 and not set(word) & set("aeiouy") and i >= TK.RARE_FROM
        assert tokenizer.tokenize(word) == [word + "</w>"]
        assert TK.check(tokenizer, word).verdict.startswith("good")
    with pytest.raises(BoothkitError, match="candidates"):
        TK.suggest(tokenizer, 10_000, seed=0)


def test_token_commands(capsys):
    for argv in (["token", "check", "[ktn]"], ["token", "suggest", "-n", "3", "--seed", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("'[ktn]' -> 4 tokens") and out[1].startswith("verdict: avoid")
    assert len(out) == 5 and all("\t(id " in line for line in out[2:])
    with pytest.raises(SystemExit):
        main(["token", "check", "sks", "--model", str(Path("/no/such/model"))])
    assert capsys.readouterr().err.strip() == "error: --model /no/such/model: no such file or folder"


def test_training_warns_on_a_common_word(instance_dir, tmp_path, caplog):
    run_training(make_cfg(instance_dir, tmp_path / "o", token="dog", class_noun="puppy", max_steps=1), progress=False)
    assert "identifier 'dog' is a common word" in caplog.text
