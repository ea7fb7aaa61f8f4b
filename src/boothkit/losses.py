"""The training objective as small pure tensor functions.

DreamBooth's loss (Ruiz et al., eq. 2) for a batch whose first half are subject examples and second half
class examples, each noised at its own timestep t with noise ε:

    L = ‖target(x, ε, t) − f(x_t, c_subject)‖²  +  λ · ‖target(x_pr, ε', t') − f(x'_t, c_class)‖²

where the target is ε (epsilon-prediction models) or v = α_t ε − σ_t x (v-prediction models).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should predict for `latents` noised with `noise` at `timesteps`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device, torch.float32)[timesteps]
        shape = (-1,) + (1,) * (latents.ndim - 1)
        sqrt_a, sqrt_1ma = a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)
        return (sqrt_a * noise.float() - sqrt_1ma * latents.float()).to(noise.dtype)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε."""
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps]
    shape = (-1,) + (1,) * (latents.ndim - 1)
    noisy = a.sqrt().view(shape) * latents.float() + (1.0 - a).sqrt().view(shape) * noise.float()
    return noisy.to(latents.dtype)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in float32 whatever the autocast dtype."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, weight: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, instance_loss, prior_loss) for a batch of [instance examples; class examples] of equal halves."""
    if pred.shape[0] % 2:
        raise ValueError("a prior-preservation batch holds as many class as instance examples")
    pred_inst, pred_prior = pred.chunk(2)
    target_inst, target_prior = target.chunk(2)
    instance_loss = mse(pred_inst, target_inst)
    prior_loss = mse(pred_prior, target_prior)
    return instance_loss + weight * prior_loss, instance_loss, prior_loss
