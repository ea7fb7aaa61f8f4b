"""The loss and noise math against independent computations (diffusers' own scheduler, hand arithmetic)."""
import pytest
import torch
from diffusers import DDPMScheduler

from boothkit.losses import add_noise, diffusion_target, mse, prior_preservation_loss


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
