"""The stages of `boothkit pretrain` (see boothkit.mini.pretrain): one function per stage of `mini` and the
dispatch of every stage, mini-flow's (boothkit.mini.flow_stages) included; the shared loop is boothkit.mini.loop."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.files import atomic_folder, atomic_write_bytes
from ..models.mini import (
    CLIP_MEAN,
    CLIP_STD,
    MINI_SCHEDULER,
    make_clip,
    make_dino,
    make_text_encoder,
    make_unet,
    make_vae,
)
from .emoji import SCENE_PROPS, save_emoji
from .flow_stages import stage_flow, stage_flow_ship
from .loop import Captions, load_stage, pixels, plot_curves, scene_generator, train_loop
from .loop import lr_lambda  # noqa: F401  (moved to loop with the shared loop; still importable from here)
from .pretrain import RECIPE, PretrainConfig

# ----------------------------------------------------------------------------------------------- stages

def stage_vae(cfg: PretrainConfig, out: Path) -> None:
    torch.manual_seed(cfg.seed)
    vae = make_vae().train()

    def step_fn(step: int, scenes: list) -> torch.Tensor:
        x = pixels([s.image for s in scenes])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()

    train_loop(cfg, out, {"vae": vae}, step_fn)


def frozen_vae(work: Path):
    vae = make_vae()
    load_stage(work / "vae", {"vae": vae})
    return vae.eval().requires_grad_(False)


def latent_scale(vae, gen, n: int = 1024) -> float:
    """1 / std of the latents (Stable Diffusion's scaling_factor, measured for this VAE), from scenes no step uses."""
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels([s.image for s in gen.batch(10**9 + i, 128)])).latent_dist.sample()
                       for i in range(0, n, 128)])
    return float(1.0 / z.std())



def stage_unet(cfg: PretrainConfig, out: Path) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    work = Path(cfg.work_dir)
    vae = frozen_vae(work)
    torch.manual_seed(cfg.seed)
    scale = latent_scale(vae, scene_generator(cfg))
    atomic_write_bytes(out / "latent_scale.json", json.dumps({"scaling_factor": scale}).encode())
    unet, text_encoder = make_unet().train(), make_text_encoder().train()
    noise_sched = DDPMScheduler(**{k: v for k, v in MINI_SCHEDULER.items() if k not in ("set_alpha_to_one",)})
    captions = Captions()

    def step_fn(step: int, scenes: list) -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(pixels([s.image for s in scenes])).latent_dist.sample() * scale
        drop = (torch.rand(len(scenes)) < 0.1).tolist()  # empty captions teach the unconditional model (CFG)
        ids = captions(["" if d else s.caption for s, d in zip(scenes, drop)])
        context = text_encoder(ids)[0]
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(scenes),))
        pred = unet(noise_sched.add_noise(z, noise, t), t, context).sample
        snr = compute_snr(noise_sched, t)
        weight = snr.clamp(max=5.0) / snr  # min-SNR-5 (Hang et al. 2023): faster, steadier convergence
        return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    train_loop(cfg, out, {"unet": unet, "text_encoder": text_encoder}, step_fn, ema=("unet", "text_encoder"),
               warmup=200)



def clip_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    x = (pixels(images) + 1) / 2
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def stage_clip(cfg: PretrainConfig, out: Path) -> None:
    torch.manual_seed(cfg.seed)
    model = make_clip().train()
    captions = Captions()

    def step_fn(step: int, scenes: list) -> torch.Tensor:
        ids = captions([s.caption for s in scenes])
        mask = (ids != 49407).long()
        mask[torch.arange(len(ids)), mask.sum(1)] = 1  # attend to the first end-of-text token (CLIP pools there)
        return model(input_ids=ids, attention_mask=mask, pixel_values=clip_pixels([s.image for s in scenes]),
                     return_loss=True).loss

    train_loop(cfg, out, {"clip": model}, step_fn)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's loss: row i of `a` and of `b` are a positive pair, all other rows negatives."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def stage_dino(cfg: PretrainConfig, out: Path) -> None:
    torch.manual_seed(cfg.seed)
    model = make_dino().train()
    head = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    gen = scene_generator(cfg)

    def step_fn(step: int, scenes: list) -> torch.Tensor:
        # the batch's scenes pick the emoji images; each is redrawn twice on other backgrounds, sizes, places
        picks = [(s.main, s.style) for s in scenes[: len(scenes) // 2]]
        views = [[gen.scene(10**8 + 2 * (step * len(scenes) + j) + v, main=m, style=st, p_second=0.0).image
                  for j, (m, st) in enumerate(picks)] for v in (0, 1)]
        feats = [head(model(pixel_values=pixels(v)).last_hidden_state[:, 0]) for v in views]
        return nt_xent(*feats)

    train_loop(cfg, out, {"dino": model, "head": head}, step_fn)


def stage_ship(cfg: PretrainConfig, out: Path) -> None:
    """fp16 weights and configs of `model` (diffusers), `clip` and `dino` (transformers) under `out`.

    No tokenizer or processor files: boothkit.models.mini writes those (from open_clip's CLIP vocabulary) when it
    builds the usable folders, which keeps the package small."""
    from diffusers import DDIMScheduler

    work = Path(cfg.work_dir)
    vae, unet, text_encoder, clip, dino = make_vae(), make_unet(), make_text_encoder(), make_clip(), make_dino()
    steps = {"vae": load_stage(work / "vae", {"vae": vae}),
             "unet": load_stage(work / "unet", {"unet": unet, "text_encoder": text_encoder}),
             "clip": load_stage(work / "clip", {"clip": clip}),
             "dino": load_stage(work / "dino", {"dino": dino})}
    scale = json.loads((work / "unet" / "latent_scale.json").read_text())["scaling_factor"]
    vae.register_to_config(scaling_factor=scale)
    for folder, module in (("model/vae", vae), ("model/unet", unet), ("model/text_encoder", text_encoder),
                           ("clip", clip), ("dino", dino)):
        module.to(torch.float16).save_pretrained(out / folder, safe_serialization=True)
    DDIMScheduler(**MINI_SCHEDULER).save_pretrained(out / "model" / "scheduler")
    atomic_write_bytes(out / "recipe.json", json.dumps({"seed": cfg.seed, "steps": steps, "recipe": RECIPE,
                                                        "latent_scaling_factor": scale}, indent=2).encode())
    write_reference(cfg, out)
    atomic_write_bytes(work / "curves.png", plot_curves(work))


def write_reference(cfg: PretrainConfig, out: Path, top: int = 60, scenes: int = 20000) -> None:
    """The most frequent names of the scenes (main or second object), and their real emoji in both training
    styles: the reference set `boothkit bench mini` and the tests judge samples against, shipped with the weights."""
    from collections import Counter


    gen = scene_generator(cfg)
    counts: Counter = Counter()
    for i in range(scenes):
        s = gen.scene(i)
        counts.update([s.main] + ([s.second] if s.second else []))
    frequent = [n for n, _ in counts.most_common(top)]
    names = frequent + [p for p in SCENE_PROPS if p not in frequent]
    save_emoji(out / "reference.npz", [e for n in names for e in gen.by_name[n]])
    atomic_write_bytes(out / "reference.json", json.dumps({"frequent": frequent, "scenes_counted": scenes,
                                                           "counts": dict(counts.most_common(top))}, indent=2).encode())



def run_pretrain(cfg) -> Path:
    """Run one stage of the recipe; returns the folder it wrote."""
    p: PretrainConfig = cfg.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    work = Path(p.work_dir)
    ships = p.stage in ("ship", "flow-ship")
    out = Path(p.ship_dir) if p.ship_dir and ships else work / p.stage
    stage = {"vae": stage_vae, "unet": stage_unet, "clip": stage_clip, "dino": stage_dino, "ship": stage_ship,
             "flow": stage_flow, "flow-ship": stage_flow_ship}[p.stage]
    if not ships:  # a training stage: its checkpoints are its own atomic saves, resumed from
        out.mkdir(parents=True, exist_ok=True)
        stage(p, out)
        return out
    # a ship replaces the shipped folder (often the package's own assets) whole, once complete: a ship killed
    # midway leaves the earlier weights loadable. Hand-written files beside them (ATTRIBUTION.md) carry over.
    with atomic_folder(out) as tmp:
        for kept in (f for f in (out.iterdir() if out.is_dir() else ()) if f.is_file()):
            shutil.copy2(kept, tmp / kept.name)
        stage(p, tmp)
    return out
