"""The training objective as small pure tensor functions.

DreamBooth's loss (Ruiz et al., eq. 2) for a batch whose first half are subject examples and second half
class examples, each noised at its own timestep t with noise ε:

    L = ‖target(x, ε, t) − f(x_t, c_subject)‖²  +  λ · ‖target(x_pr, ε', t') − f(x'_t, c_class)‖²

where the target is ε (epsilon-prediction models) or v = α_t ε − σ_t x (v-prediction models).
"""
from __future__ import annotations

from dataclasses import dataclass

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


# ----------------------------------------------------------------------- training extras (all off by default)

def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep, in float32."""
    a = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight of each example (Hang et al. 2023), for the loss of its prediction type.

    The x₀ loss weighted by min(SNR, γ) equals the ε loss weighted by min(SNR, γ)/SNR and the v loss weighted
    by min(SNR, γ)/(SNR + 1) (diffusers' train_text_to_image.py). Where SNR is 0 (a zero-terminal-SNR schedule's
    last step) the ε weight is its limit, 1.
    """
    s = snr(alphas_cumprod, timesteps)
    clipped = s.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(s > 0, clipped / s, torch.ones_like(s))
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass(frozen=True)
class MaskRule:
    """How a loss mask weighs an example's error: what the mask leaves out counts `outside` (0: not at all;
    OneTrainer's "unmasked weight"), and the weighted error is averaged over the whole picture ("image", kohya's
    rule: the subject's pixels pull as hard as without a mask) or over the mask's weight ("area": every example
    counts fully, however small its subject: the gradient grows by one over the mask's share)."""

    outside: float = 0.0
    mean: str = "image"


def example_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                rule: MaskRule = MaskRule()) -> torch.Tensor:
    """Mean squared error of each example, in float32; with `mask` (B, 1, h, w, weights in [0, 1]) weighted and
    averaged as `rule` says."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.flatten(1).mean(1)
    m = mask.to(err.device, torch.float32).expand_as(err)
    m = rule.outside + (1.0 - rule.outside) * m
    if rule.mean == "area":
        return (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)
    return (err * m).flatten(1).mean(1)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                  mask: torch.Tensor | None, prior_weight: float | None, rule: MaskRule = MaskRule()
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, instance_loss, prior_loss) from per-example errors times per-example `weights` (min-SNR), each
    example's error weighted by its `mask` as `rule` says; with `prior_weight` the batch is [subject; class]."""
    return examples_loss(example_mse(pred, target, mask, rule), weights, prior_weight)


def examples_loss(per: torch.Tensor, weights: torch.Tensor | None, prior_weight: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, instance_loss, prior_loss) from each example's error `per`: each half's mean over its examples."""
    if weights is not None:
        per = per * weights.to(per.device, torch.float32)
    if prior_weight is None:
        loss = per.mean()
        return loss, loss, torch.zeros_like(loss)
    if per.shape[0] % 2:
        raise ValueError("a prior-preservation batch holds as many class as instance examples")
    instance_loss, prior_loss = (half.mean() for half in per.chunk(2))
    return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss
