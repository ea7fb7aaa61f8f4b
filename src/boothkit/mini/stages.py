"""The stages of `boothkit pretrain` (see boothkit.mini.pretrain): data, the shared loop, one function per stage."""
from __future__ import annotations

import csv
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..core.files import atomic_write_bytes
from ..core.progress import progress_bar
from ..core.report import figure_png
from ..models.mini import (
    CLIP_MEAN,
    CLIP_STD,
    MINI_SCHEDULER,
    make_clip,
    make_dino,
    make_text_encoder,
    make_unet,
    make_vae,
    tokenizer,
)
from ..train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_states
from .emoji import SCENE_PROPS, load_emoji, save_emoji, world
from .pretrain import RECIPE, PretrainConfig
from .scenes import SceneGenerator

# ------------------------------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=2)
def scene_generator(cfg: PretrainConfig):
    """The stage's scenes; cached, so a stage that draws from it twice loads the emoji once."""
    if cfg.emoji_file:
        if not Path(cfg.emoji_file).is_file():
            raise ConfigError(f"pretrain.emoji_file: {cfg.emoji_file} does not exist")
        return SceneGenerator(load_emoji(Path(cfg.emoji_file)), seed=cfg.seed)
    return SceneGenerator(world(), seed=cfg.seed)


def pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 pictures -> float tensor in [-1, 1], NCHW."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def batches(gen, batch: int, start_step: int) -> Iterator[tuple[int, list]]:
    """(step, scenes) from `start_step` on; step s always gets the same scenes, so a resume sees the same data."""
    step = start_step
    while True:
        yield step, gen.batch(step * batch, batch)
        step += 1


# ------------------------------------------------------------------------------------------------- loop

def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


class Log:
    """Appends rows to OUT/log.csv; a resumed run keeps the rows it had."""

    def __init__(self, path: Path, fields: Sequence[str], start_step: int):
        self.path, self.fields = path, list(fields)
        rows = []
        if path.is_file() and start_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, **row: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def train_loop(cfg: PretrainConfig, out: Path, modules: dict[str, torch.nn.Module], step_fn: Callable,
               *, ema: Sequence[str] = (), warmup: int = 100) -> None:
    """The shared loop: AdamW over `modules`, warm-up + cosine lr, EMA copies of the modules named in `ema`,
    resumable checkpoints, log.csv, progress bar. `step_fn(step, scenes) -> loss`."""
    from diffusers.training_utils import EMAModel


    steps, batch, lr = cfg.recipe()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(steps, min(warmup, steps)))
    emas = {n: EMAModel(modules[n].parameters(), decay=0.9995, use_ema_warmup=True, power=2 / 3) for n in ema}
    start = 0
    if found := list_checkpoints(out):
        ck = load_checkpoint(found[-1][1])
        for name, m in modules.items():
            m.load_state_dict(_prefixed(ck["weights"], name))
        for name, e in emas.items():
            e.load_state_dict(_ema_state(ck, found[-1][1], name))
        optim.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["lr_scheduler"])
        set_rng_states(ck["rng"])
        start = ck["step"]
    gen = scene_generator(cfg)
    log = Log(out / "log.csv", ["step", "loss", "lr", "seconds"], start)
    t0 = time.time()
    with progress_bar(f"pretrain {cfg.stage}", steps, completed=start, show_loss=True) as advance:
        for step, scenes in batches(gen, batch, start):
            if step >= steps:
                break
            loss = step_fn(step, scenes)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            for name, e in emas.items():
                e.step(modules[name].parameters())
            log.write(step=step + 1, loss=f"{loss.item():.5f}", lr=f"{sched.get_last_lr()[0]:.3e}",
                      seconds=f"{time.time() - t0:.1f}")
            advance(loss=loss.item())
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                weights = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
                # the EMAs go inside the checkpoint, written and renamed with it: a kill never leaves one without
                save_checkpoint(out, step + 1, weights, optim, sched, keep=2,
                                states={f"ema-{name}": e.state_dict() for name, e in emas.items()})


def _ema_state(ck: dict, path: Path, name: str) -> dict:
    """An EMA's state from a checkpoint: inside it, or (checkpoints written before that) in ema-NAME.pt beside it."""
    if f"ema-{name}" in ck["states"]:
        return ck["states"][f"ema-{name}"]
    return torch.load(path / f"ema-{name}.pt", weights_only=True)


def _prefixed(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}


def load_stage(out: Path, modules: dict[str, torch.nn.Module]) -> int:
    """Load a finished stage's weights into `modules` (EMA weights where the stage kept them); returns its step."""
    from diffusers.training_utils import EMAModel


    found = list_checkpoints(out)
    if not found:
        raise ConfigError(f"pretrain: {out} has no checkpoint; run that stage first")
    step, path = found[-1]
    ck = load_checkpoint(path)
    for name, m in modules.items():
        m.load_state_dict(_prefixed(ck["weights"], name))
        if f"ema-{name}" in ck["states"] or (path / f"ema-{name}.pt").is_file():
            e = EMAModel(m.parameters())
            e.load_state_dict(_ema_state(ck, path, name))
            e.copy_to(m.parameters())
    return step


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


class Captions:
    """Tokenised captions, memoised: the slow tokenizer sees each distinct caption once."""

    def __init__(self):
        self.tok, self.cache = tokenizer(), {}

    def __call__(self, captions: Sequence[str], max_length: int = 77) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tok(missing, padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


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


def plot_curves(work: Path) -> bytes:
    """PNG: the loss curve of every stage that has a log (raw and smoothed over 50 steps)."""
    from matplotlib.figure import Figure


    stages = [s for s in ("vae", "unet", "clip", "dino") if (work / s / "log.csv").is_file()]
    fig = Figure(figsize=(3.2 * max(1, len(stages)), 2.8))
    for k, stage in enumerate(stages):
        with (work / stage / "log.csv").open() as f:
            rows = list(csv.DictReader(f))
        steps, loss = [int(r["step"]) for r in rows], np.array([float(r["loss"]) for r in rows])
        smooth = np.convolve(loss, np.ones(50) / 50, mode="valid") if len(loss) >= 50 else loss
        ax = fig.add_subplot(1, len(stages), k + 1)
        ax.plot(steps, loss, lw=0.4, alpha=0.4)
        ax.plot(steps[len(steps) - len(smooth):], smooth, lw=1.2)
        ax.set_title(f"{stage}: final {smooth[-1]:.4f}, {float(rows[-1]['seconds']) / 60:.0f} min", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def run_pretrain(cfg) -> Path:
    """Run one stage of the recipe; returns the folder it wrote."""
    p: PretrainConfig = cfg.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    work = Path(p.work_dir)
    out = (Path(p.ship_dir) if p.ship_dir else work / "ship") if p.stage == "ship" else work / p.stage
    out.mkdir(parents=True, exist_ok=True)
    {"vae": stage_vae, "unet": stage_unet, "clip": stage_clip, "dino": stage_dino, "ship": stage_ship}[p.stage](p, out)
    return out
