"""The loss and noise math against independent computations (diffusers' own scheduler, hand arithmetic)."""
import pytest
import torch
from diffusers import DDPMScheduler

from boothkit.train.losses import (MaskRule, add_noise, diffusion_target, example_mse, min_snr_weights, mse,
    prior_preservation_loss, weighted_loss)


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _draws(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 17, 500, 999])


def test_add_noise_matches_diffusers(sched):
    x, eps, t = _draws()
    ours = add_noise(x, eps, sched.alphas_cumprod, t)
    torch.testing.assert_close(ours, sched.add_noise(x, eps, t), rtol=1e-5, atol=1e-6)


def test_v_target_matches_diffusers_velocity(sched):
    x, eps, t = _draws(1)
    ours = diffusion_target("v_prediction", x, eps, sched.alphas_cumprod, t)
    torch.testing.assert_close(ours, sched.get_velocity(x, eps, t), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, eps)


def test_epsilon_and_sample_targets(sched):
    x, eps, t = _draws(2)
    assert diffusion_target("epsilon", x, eps, sched.alphas_cumprod, t) is eps
    assert diffusion_target("sample", x, eps, sched.alphas_cumprod, t) is x
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target("flow", x, eps, sched.alphas_cumprod, t)


def test_prior_preservation_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 2.0], [3.0, 2.0], [1.0, 0.0], [1.0, 4.0]])
    loss, inst, prior = prior_preservation_loss(pred, target, weight=0.5)
    # instance rows: errors 1,0,0,4 -> mean 1.25 ; class rows: errors 1,0,0,9 -> mean 2.5
    assert inst.item() == pytest.approx(1.25)
    assert prior.item() == pytest.approx(2.5)
    assert loss.item() == pytest.approx(1.25 + 0.5 * 2.5)


def test_prior_weight_zero_is_instance_only_and_odd_batch_rejected():
    pred, target = torch.randn(6, 3), torch.randn(6, 3)
    loss, inst, _ = prior_preservation_loss(pred, target, weight=0.0)
    assert loss.item() == pytest.approx(mse(pred[:3], target[:3]).item())
    with pytest.raises(ValueError):
        prior_preservation_loss(torch.randn(3, 2), torch.randn(3, 2), 1.0)


def test_mse_is_float32_under_bf16():
    a, b = torch.randn(2, 8).bfloat16(), torch.randn(2, 8).bfloat16()
    out = mse(a, b)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(((a.float() - b.float()) ** 2).mean().item())


# ------------------------------------------------------------------------------------- min-SNR-γ and masks

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers_recipe(sched, prediction_type):
    """Against diffusers' compute_snr and train_text_to_image.py's weighting, and by hand at two timesteps."""
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 17, 500, 999])
    s = compute_snr(sched, t)
    clipped = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0]
    want = {"epsilon": clipped / s, "v_prediction": clipped / (s + 1), "sample": clipped}[prediction_type]
    got = min_snr_weights(sched.alphas_cumprod, t, 5.0, prediction_type)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    a0, a999 = float(sched.alphas_cumprod[0]), float(sched.alphas_cumprod[999])
    snr0, snr999 = a0 / (1 - a0), a999 / (1 - a999)  # ≈ 1175 (clipped to 5) and ≈ 0.0047 (below γ)
    by_hand = {"epsilon": (5 / snr0, 1.0), "v_prediction": (5 / (snr0 + 1), snr999 / (snr999 + 1)),
               "sample": (5.0, snr999)}[prediction_type]
    assert got[[0, 3]].tolist() == pytest.approx(by_hand, rel=1e-4)


def test_min_snr_weights_at_zero_snr_and_bad_type():
    alphas = torch.tensor([0.9, 0.5, 0.0])  # a zero-terminal-SNR schedule ends at ᾱ = 0
    t = torch.tensor([0, 1, 2])
    assert min_snr_weights(alphas, t, 5.0, "epsilon").tolist() == pytest.approx([5 / 9, 1.0, 1.0])
    assert min_snr_weights(alphas, t, 5.0, "v_prediction").tolist() == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(alphas, t, 5.0, "flow")


def test_weighted_loss_by_hand():
    pred = torch.zeros(4, 1, 1, 2)
    target = torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 1.0]).view(4, 1, 1, 2)  # errors 1, 2, 0, 5
    w = torch.tensor([1.0, 0.5, 2.0, 0.1])
    loss, inst, prior = weighted_loss(pred, target, w, None, prior_weight=2.0)
    assert inst.item() == pytest.approx((1 * 1 + 0.5 * 2) / 2)
    assert prior.item() == pytest.approx((2 * 0 + 0.1 * 5) / 2)
    assert loss.item() == pytest.approx(1.0 + 2.0 * 0.25)
    # without weights or masks it is the plain loss (up to float rounding)
    plain = prior_preservation_loss(pred, target, 2.0)
    assert [x.item() for x in weighted_loss(pred, target, None, None, 2.0)] == pytest.approx([x.item() for x in plain])


@pytest.mark.parametrize("outside, mean", [(0.0, "image"), (0.0, "area"), (0.1, "image"), (0.25, "area")])
def test_mask_rule_by_hand(outside, mean):
    """Each example's weighted error, written out pixel by pixel: black counts `outside`, white 1, grey between."""
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :, :1] = 1.0  # a quarter of the first picture
    mask[1, :, 2:, :] = 0.5  # half of the second, grey
    got = example_mse(pred, target, mask, MaskRule(outside, mean))
    for b in range(2):
        num = den = 0.0
        for c in range(4):
            for y in range(4):
                for x in range(4):
                    w = outside + (1 - outside) * float(mask[b, 0, y, x])
                    num += w * float(pred[b, c, y, x] - target[b, c, y, x]) ** 2
                    den += w if mean == "area" else 1.0
        assert got[b].item() == pytest.approx(num / den, rel=1e-5)


def test_masked_mse_ignores_what_lies_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :3] = 1.0
    other = pred.clone()
    other[..., 3:] = 100.0  # outside the mask
    torch.testing.assert_close(example_mse(pred, target, mask), example_mse(other, target, mask), rtol=0, atol=0)
    inside = ((pred - target) ** 2)[..., :3].flatten(1).mean(1)
    torch.testing.assert_close(example_mse(pred, target, mask, MaskRule(mean="area")), inside)
    torch.testing.assert_close(example_mse(pred, target, mask), inside * 3 / 8)  # image mean: 3 of 8 columns
    assert not torch.allclose(example_mse(pred, target), inside)
