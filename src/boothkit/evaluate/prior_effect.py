"""`bench prior-effect`: what prior preservation does, measured without pretrained weights — subject fit (LPIPS to
the photos) and class drift (UNet outputs and samples for the class prompt, trained vs frozen), with and without the
loss, and with the frozen model's prediction as the class target."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..core import config as C
from ..core.config import opt
from ..core.files import atomic_write_bytes
from ..core.report import Report, table_csv
from .metrics import load_lpips, lpips_pairs

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

@dataclass(frozen=True)
class PriorEffectConfig:
    instance_dir: str = opt("", "Photos of the subject (e.g. a DreamBooth benchmark subject folder).", required=True)
    class_noun: str = opt("", "Class noun of the subject, e.g. 'dog'.", required=True)
    model: str = opt("tiny", "Base model of both runs.")
    train_config: Optional[str] = opt(None, "TOML train config for both runs (the flags here override it).")
    max_steps: int = opt(200, "Training steps of each run.", min=1)
    num_class_images: int = opt(50, "Class images for the run with prior preservation.", min=1)
    seed: int = opt(0, "Training seed (both runs) and first sampling seed.")
    samples: int = opt(8, "Samples per prompt and model (seeds seed .. seed + samples - 1).", min=1)
    sample_steps: int = opt(20, "Sampling steps.", min=1)
    guidance: float = opt(7.5, "Classifier-free guidance scale.", min=0.0)
    drift_draws: int = opt(32, "(class image, noise, timestep) draws for the UNet-output drift.", min=1)
    lpips_net: str = opt("alex", "LPIPS trunk (weights from `boothkit lpips import`).", choices=("alex", "vgg"))
    lpips_size: int = opt(0, "Image size for LPIPS (0: the model's native resolution).", min=0)
    out: str = opt("", "Output folder (runs, class images, prior_effect.json/.csv/.html).", required=True)


PRIOR_EFFECT_SECTIONS: dict[str, type] = {"effect": PriorEffectConfig}
VARIANTS = ("frozen model", "with prior preservation", "without prior preservation",
            "with prior preservation, frozen-model target")
# trained variant -> (output folder, train overrides)
TRAINED = {VARIANTS[1]: ("with_prior", {"prior": True}), VARIANTS[2]: ("without_prior", {"prior": False}),
           VARIANTS[3]: ("with_prior_frozen_target", {"prior": True, "prior_target": "frozen"})}
EFFECT_COLUMNS = ("model", "subject_fit_lpips", "class_unet_mse", "class_sample_lpips", "identifier_unet_mse",
                  "final_loss")


def _use_adapter(pipe, name: Optional[str]) -> None:
    """Activate one LoRA adapter of `pipe` at scale 1, or none (the frozen base model)."""
    if name is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[1.0])


def denoiser_outputs(pipe, prompt: str, latents, noise, timesteps, batch: int = 8):
    """The denoiser's predictions for `prompt` on latents noised with fixed noise at fixed timesteps, through the
    family: its objective noises them (DDPM or rectified flow), its encoder and denoiser call do the rest."""
    import torch

    from ..models.families import Conditioning, family_of, micro_conditioning
    from ..train.objectives import make_objective

    family = family_of(pipe)
    model = getattr(pipe, family.denoiser)
    objective = make_objective(family, pipe.scheduler, C.TrainConfig(output_dir="-"))
    device = model.device
    out = []
    with torch.no_grad():
        ids = family.tokenize([getattr(pipe, t) for t in family.tokenizers], prompt)
        cond = family.encode([getattr(pipe, n) for n in family.text_encoders], [i.to(device) for i in ids])
        for k in range(0, len(latents), batch):
            x = objective.noisy(latents[k:k + batch].to(device), noise[k:k + batch].to(device), timesteps[k:k + batch])
            n, side = len(x), latents.shape[-1] * int(pipe.vae_scale_factor)
            batch_cond = Conditioning(cond.hidden.expand(n, -1, -1),
                                      None if cond.pooled is None else cond.pooled.expand(n, -1))
            time_ids = micro_conditioning((side, side), (0, 0), (side, side)).expand(n, -1)  # SDXL's; others ignore
            out.append(family.denoise(model, x, timesteps[k:k + batch].to(device), batch_cond,
                                      time_ids).float().cpu())
    return torch.cat(out)


def drift_inputs(pipe, images: Sequence, draws: int, seed: int, size: int):
    """Fixed (latents, noise, timesteps): class images (cycled) through the VAE, noise and t from `seed` (t on the
    scheduler's 0..N-1 steps: for the flow families σ·1000 at the same points)."""
    import torch

    from ..train.data import stack_prepared

    vae = pipe.vae
    pixels = stack_prepared([images[k % len(images)] for k in range(draws)], size).to(vae.device, vae.dtype)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        latents = (vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (draws,), generator=g)
    return latents.float().cpu(), noise, timesteps


def _final_loss(run: Path) -> Optional[float]:
    import csv

    path = run / "train_log.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open()))
    return float(rows[-1]["loss"]) if rows else None


def run_prior_effect(cfg: C.RunConfig, progress: bool = True) -> dict[str, Any]:
    """`boothkit bench prior-effect`: train with and without prior preservation, measure fit and class drift."""
    from ..generate.generation import generate_images, load_generation_pipeline
    from ..models.loading import native_resolution
    from ..train.data import load_folder, load_image
    from ..train.loop import run_training

    e = cfg.effect
    out = Path(e.out)
    lp = load_lpips(e.lpips_net)  # fails early when the weights were never imported
    train_values = C.load_toml(e.train_config) if e.train_config else {}
    common = dict(instance_dir=e.instance_dir, class_noun=e.class_noun, model=e.model, max_steps=e.max_steps,
                  num_class_images=e.num_class_images, seed=e.seed, class_dir=str(out / "class_images"))
    runs, tcfgs = {}, {}
    for variant, (folder, overrides) in TRAINED.items():
        tcfgs[variant] = C.resolve(C.TRAIN_SECTIONS, train_values,
                                   {**common, **overrides, "output_dir": str(out / folder)}, where="--train-config")
        runs[variant] = run_training(tcfgs[variant], progress=progress)
    tcfg = tcfgs[VARIANTS[1]]
    instance_prompt, class_prompt = tcfg.data.prompt, tcfg.prior.prompt_for(e.class_noun)

    pipe = load_generation_pipeline(e.model, [(str(runs[v]), 1.0) for v in TRAINED])
    size = native_resolution(pipe)
    lsize = e.lpips_size or size
    photos = [img for _, img in load_folder(e.instance_dir)]
    class_images = [load_image(p) for p in sorted((out / "class_images").glob("*.png"))]
    drift = drift_inputs(pipe, class_images, e.drift_draws, e.seed, size)
    id_drift = drift_inputs(pipe, photos, e.drift_draws, e.seed, size)
    kw = dict(num_images=e.samples, seed=e.seed, steps=e.sample_steps, guidance=e.guidance)
    measured = {}
    for variant, adapter in zip(VARIANTS, [None] + [f"lora{k}" for k in range(len(TRAINED))]):
        _use_adapter(pipe, adapter)
        measured[variant] = dict(id=generate_images(pipe, instance_prompt, **kw),
                                 cls=generate_images(pipe, class_prompt, **kw),
                                 eps_cls=denoiser_outputs(pipe, class_prompt, *drift),
                                 eps_id=denoiser_outputs(pipe, instance_prompt, *id_drift))
    frozen = measured[VARIANTS[0]]
    n, m = e.samples, len(photos)
    rows = []
    for variant, res in measured.items():
        fit = lpips_pairs(lp, res["id"] + photos, [(i, n + j) for i in range(n) for j in range(m)], lsize)
        cls = lpips_pairs(lp, res["cls"] + frozen["cls"], [(i, n + i) for i in range(n)], lsize)
        rows.append({"model": variant, "subject_fit_lpips": float(fit.mean()),
                     "class_unet_mse": float(((res["eps_cls"] - frozen["eps_cls"]) ** 2).mean()),
                     "class_sample_lpips": float(cls.mean()),
                     "identifier_unet_mse": float(((res["eps_id"] - frozen["eps_id"]) ** 2).mean()),
                     "final_loss": _final_loss(runs[variant]) if variant in runs else None})
    result = {"table": rows, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
              "settings": cfg.to_dict(), "train": {v: c.to_dict() for v, c in tcfgs.items()},
              "lpips": f"LPIPS v0.1, {e.lpips_net} trunk, {lsize}px"}
    _write_prior_effect(out, result, measured, photos)
    return result


EFFECT_LABELS = {"model": "model", "subject_fit_lpips": "subject LPIPS ↓", "class_unet_mse": "class UNet MSE ↓",
                 "class_sample_lpips": "class sample LPIPS ↓", "identifier_unet_mse": "identifier UNet MSE",
                 "final_loss": "final loss"}
EFFECT_HELP = {
    "subject_fit_lpips": "LPIPS from identifier-prompt samples to the subject photos (lower: closer to the subject)",
    "class_unet_mse": "MSE between this model's and the frozen model's UNet outputs for the class prompt "
                      "(same latents, noise, timesteps; lower: less class drift)",
    "class_sample_lpips": "LPIPS between class-prompt samples of this model and the frozen model at the same seeds "
                          "(lower: less class drift)",
    "identifier_unet_mse": "the same UNet-output MSE for the identifier prompt (how far training moved the subject)",
    "final_loss": "last logged training loss",
}


def _write_prior_effect(out: Path, result: Mapping[str, Any], measured: Mapping[str, Mapping], photos) -> Path:
    from rich.console import Console
    from rich.table import Table


    rows = result["table"]
    atomic_write_bytes(out / "prior_effect.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(out / "prior_effect.csv", table_csv(rows, EFFECT_COLUMNS).encode())
    table = Table(*(EFFECT_LABELS[c] for c in EFFECT_COLUMNS), title="prior preservation: subject fit vs class drift")
    for r in rows:
        table.add_row(r["model"], *("–" if r[c] is None else f"{r[c]:.4g}" for c in EFFECT_COLUMNS[1:]))
    console = Console()
    console.print(table)
    from ..models.loading import is_tiny

    rep = Report("boothkit prior-effect")
    if is_tiny(result["settings"]["effect"]["model"]):
        rep.notice("Measured on the built-in tiny model, which has random weights: its samples are noise-like and "
                   "its text encoder barely tells the class prompt from the identifier prompt, so these numbers "
                   "show what training moves, not the paper's effect on a pretrained model. LPIPS uses the real "
                   "pretrained weights. Run with --model <Stable Diffusion folder or hub id> for the real measurement.")
    rep.table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows], EFFECT_COLUMNS,
              "Subject fit and class drift, with and without prior preservation (same steps and seed)")
    for key, text in EFFECT_HELP.items():
        rep.text(f"{key}: {text}")
    rep.heading("Samples (same seeds)")
    rep.images("subject photos", photos, real=True)
    for variant, res in measured.items():
        rep.images(f"{variant}: {result['instance_prompt']}", res["id"])
        rep.images(f"{variant}: {result['class_prompt']}", res["cls"])
    rep.settings({"settings": result["settings"], "train": result["train"], "lpips": result["lpips"]})
    path = rep.write(out / "prior_effect.html")
    console.print(f"report: {path}")
    return path
