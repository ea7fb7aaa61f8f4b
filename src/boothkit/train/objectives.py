"""What the denoiser learns to predict: how a step draws timesteps, noises latents, and what the target and each
example's loss weight are. A family names its objective (`Family.objective`); `make_objective` builds it.

- diffusion (SD 1.x/2.x, SDXL): a DDPM schedule; x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε; target ε or v; optional
  min-SNR-γ weights.
- flow (SD3/3.5, FLUX.1): rectified flow as diffusers' train_dreambooth_lora_{sd3,flux}.py: u drawn by
  `compute_density_for_timestep_sampling` (logit-normal, mode or uniform), σ the scheduler's sigma at index
  ⌊u·1000⌋, x_t = (1 − σ)·x_0 + σ·ε, target ε − x_0, timestep σ·1000, weights `compute_loss_weighting_for_sd3`
  (sigma_sqrt, cosmap, or none). The shift of σ: the scheduler's static shift (SD3's 3.0), or, for a scheduler
  that shifts by resolution (Flux), FluxPipeline's resolution-dependent shift: μ from the image's token count,
  σ' = e^μ / (e^μ + 1/σ − 1).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.errors import ConfigError
from .losses import add_noise, diffusion_target, min_snr_weights


@dataclass
class DiffusionObjective:
    alphas_cumprod: torch.Tensor
    prediction_type: str
    snr_gamma: Optional[float] = None

    def timesteps(self, parts: list[tuple[int, tuple[int, int]]], g: torch.Generator) -> torch.Tensor:
        """One timestep per example of `parts` ((examples, latent grid) of each pass)."""
        return torch.randint(0, len(self.alphas_cumprod), (sum(n for n, _ in parts),), generator=g)

    def noisy(self, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x, e, self.alphas_cumprod, t)

    def target(self, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.prediction_type, x, e, self.alphas_cumprod, t)

    def fingerprint(self, t) -> dict:
        return {}  # snr_gamma and noise_offset are recorded for every run

    def weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        if self.snr_gamma is None:
            return None
        return min_snr_weights(self.alphas_cumprod, t, self.snr_gamma, self.prediction_type)


@dataclass
class FlowObjective:
    sigmas: torch.Tensor            # the scheduler's training sigmas, descending from 1 (before any dynamic shift)
    weighting: str = "logit_normal"  # diffusers' weighting_scheme: logit_normal, mode, uniform (none), sigma_sqrt, cosmap
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    dynamic: Optional[dict] = None  # the scheduler's resolution-shift settings when it shifts by resolution

    def timesteps(self, parts: list[tuple[int, tuple[int, int]]], g: torch.Generator) -> torch.Tensor:
        """σ·1000 of every example of `parts` ((examples, latent grid (h, w)) of each pass): drawn at once, each
        pass's examples shifted for its own grid (a bucketed subject half and the square class half differ)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        n = sum(k for k, _ in parts)
        u = compute_density_for_timestep_sampling(self.weighting, n, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale, generator=g)
        sigma = self.sigmas[(u * len(self.sigmas)).long()]
        if self.dynamic is not None:
            sigma = torch.cat([resolution_shift(s, (h // 2) * (w // 2), self.dynamic)
                               for s, (_, (h, w)) in zip(sigma.split([k for k, _ in parts]), parts)])
        return sigma * 1000.0

    @staticmethod
    def _sigma(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device, torch.float32) / 1000.0).view((-1,) + (1,) * (like.ndim - 1))

    def noisy(self, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t, x)
        return ((1.0 - s) * x.float() + s * e.float()).to(x.dtype)

    def target(self, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (e.float() - x.float()).to(e.dtype)

    def fingerprint(self, t) -> dict:
        """The settings of TrainConfig `t` this objective's draws and weights depend on (a resume must match)."""
        fp = {"weighting_scheme": t.weighting_scheme, "flow_shift": t.flow_shift}
        if t.weighting_scheme == "logit_normal":
            fp.update(logit_mean=t.logit_mean, logit_std=t.logit_std)
        if t.weighting_scheme == "mode":
            fp["mode_scale"] = t.mode_scale
        return fp

    def weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.weighting not in ("sigma_sqrt", "cosmap"):  # the sampling schemes weigh every example 1
            return None
        return compute_loss_weighting_for_sd3(self.weighting, t.float() / 1000.0)


def resolution_shift(sigma: torch.Tensor, tokens: int, dyn: dict) -> torch.Tensor:
    """FluxPipeline's shift for an image of `tokens` packed tokens: μ interpolated between base_shift at
    base_image_seq_len and max_shift at max_image_seq_len (calculate_shift), then the exponential time shift."""
    slope = (dyn["max_shift"] - dyn["base_shift"]) / (dyn["max_image_seq_len"] - dyn["base_image_seq_len"])
    mu = tokens * slope + dyn["base_shift"] - slope * dyn["base_image_seq_len"]
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def flow_objective(scheduler, t) -> FlowObjective:
    """The flow objective of a FlowMatchEulerDiscreteScheduler and the run's train settings."""
    config = scheduler.config
    dynamic_scheduler = bool(config.get("use_dynamic_shifting", False))
    shift = t.flow_shift if t.flow_shift != "auto" else ("resolution" if dynamic_scheduler else "static")
    if shift == "resolution" and not dynamic_scheduler:  # its sigmas are shifted already; its pipeline samples so
        raise ConfigError("train.flow_shift (--flow-shift) resolution: this model's scheduler shifts σ statically "
                          f"(shift {config.get('shift', 1.0):g}), as its pipeline samples; use static or auto")
    # the scheduler's own sigmas at creation: shifted by its static shift unless it shifts dynamically
    fresh = type(scheduler).from_config(copy.deepcopy(dict(config)))
    sigmas = fresh.sigmas[:config.num_train_timesteps].float()  # σ of index ⌊u·N⌋, as the scripts draw it
    dyn = {k: float(config[k]) for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")} \
        if shift == "resolution" else None
    return FlowObjective(sigmas, t.weighting_scheme, t.logit_mean, t.logit_std, t.mode_scale, dyn)


def check_flags(family, t) -> None:
    """A loss flag the family's objective does not take is refused by name (before any weights load)."""
    if family.objective == "flow" and t.snr_gamma is not None:
        raise ConfigError(f"train.snr_gamma (--snr-gamma): min-SNR weighting is for diffusion models; "
                          f"{family.label} learns rectified flow (see --weighting-scheme)")
    if family.objective != "flow":
        for key, value, default in (("weighting_scheme", t.weighting_scheme, "logit_normal"),
                                    ("flow_shift", t.flow_shift, "auto")):
            if value != default:
                raise ConfigError(f"train.{key} (--{key.replace('_', '-')}) {value}: applies to the flow-matching "
                                  f"families (SD3/3.5, FLUX.1), not {family.label} models")


def make_objective(family, scheduler, t):
    """The objective `family` learns, for the model's scheduler and the run's TrainConfig `t`."""
    from diffusers import DDPMScheduler

    check_flags(family, t)
    if family.objective == "flow":
        return flow_objective(scheduler, t)
    ddpm = DDPMScheduler.from_config(scheduler.config)
    return DiffusionObjective(ddpm.alphas_cumprod, ddpm.config.prediction_type, t.snr_gamma)
