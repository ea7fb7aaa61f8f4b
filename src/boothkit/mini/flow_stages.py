"""mini-flow's stages of `boothkit pretrain` (the model: boothkit.models.mini_flow; the recipe: docs/mini.md):

  flow       FluxTransformer2DModel + a small T5 encoder from scratch on the same scenes and captions as mini's
             unet stage, on the latents of mini's shipped VAE (shifted and scaled by their measured mean and
             1/std), conditioned on mini's frozen CLIP text encoder's pooled output and T5's sequence: rectified
             flow (boothkit's FlowObjective, logit-normal σ) through the FLUX family's own encode and denoise
             (2x2 packing, position ids), 10% empty captions, EMA weights, sample grids at every checkpoint
  flow-ship  what mini-flow trained (the EMA weights of the transformer and T5, fp16 safetensors, the T5
             tokenizer) and recipe.json: what `boothkit.models.mini_flow.mini_flow_dir()` holds once a run ships

Both reuse mini's loop (boothkit.mini.loop): the same scenes per step, checkpoints, resume and log.csv.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.files import atomic_write_bytes
from ..generate.generation import make_grid, parameters_text, pipeline_fields, sampler_label, save_png
from ..models.families import FLUX
from ..models.mini import mini_dir
from ..models.mini_flow import (
    MINI_FLOW,
    MINI_FLOW_SCHEDULER,
    T5,
    T5_MAX_LENGTH,
    TRANSFORMER,
    flux_pipeline,
    make_scheduler,
    make_t5,
    make_transformer,
    mini_clip,
    mini_vae,
    t5_tokenizer,
)
from ..train.objectives import FlowObjective
from .loop import Captions, load_stage, pixels, plot_curves, scene_generator, train_loop
from .pretrain import RECIPE, PretrainConfig
from .scenes import with_article

SAMPLE_GUIDANCE = 5.0  # true classifier-free guidance of the sample grids (FluxPipeline's true_cfg_scale)
SAMPLE_STEPS = 20
SAMPLE_SEEDS = (0, 1)
SAMPLE_NAMES = 12  # the most frequent names of the scenes (mini's reference.json), as mini's grid
LATENT_SCENES = 1024  # scenes that measure the latents' mean and std


def latent_stats(vae, gen) -> dict[str, float]:
    """The latents' mean and 1/std (FluxPipeline's shift_factor and scaling_factor, measured for mini's VAE as
    FLUX.1's were for its own), from scenes no step uses."""
    n = LATENT_SCENES
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels([s.image for s in gen.batch(10**9 + i, 128)])).latent_dist.sample()
                       for i in range(0, n, 128)])
    return {"shift_factor": float(z.mean()), "scaling_factor": float(1.0 / (z - z.mean()).std())}


def sample_prompts() -> list[str]:
    names = json.loads((mini_dir() / "reference.json").read_text())["frequent"][:SAMPLE_NAMES]
    return [f"an emoji of {with_article(n)}" for n in names]


def write_sample_grid(pipe, prompts: Sequence[str], path: Path, seeds: Sequence[int] | None = None) -> Path:
    """A PNG with its parameters: one row per seed (SAMPLE_SEEDS unless given), one column per prompt, with true
    CFG against the empty caption (as trained)."""
    seeds = list(SAMPLE_SEEDS if seeds is None else seeds)
    images = []
    for seed in seeds:
        images += pipe(prompt=list(prompts), negative_prompt=[""] * len(prompts), true_cfg_scale=SAMPLE_GUIDANCE,
                       num_inference_steps=SAMPLE_STEPS, height=64, width=64, max_sequence_length=T5_MAX_LENGTH,
                       generator=torch.Generator().manual_seed(seed)).images
    text = parameters_text("\n".join(prompts), "", steps=SAMPLE_STEPS, sampler=sampler_label(pipe.scheduler),
                           guidance=SAMPLE_GUIDANCE, seed=seeds, width=64, height=64, loras=[],
                           **{**pipeline_fields(pipe), "model": f"mini-flow pretraining at {path.stem}"})
    return save_png(make_grid(images, cols=len(prompts)), path, text)


def stage_flow(cfg: PretrainConfig, out: Path) -> None:
    torch.manual_seed(cfg.seed)
    gen = scene_generator(cfg)
    vae = mini_vae().eval().requires_grad_(False)
    stats = latent_stats(vae, gen)
    vae.register_to_config(**stats)
    atomic_write_bytes(out / "latents.json", json.dumps(stats).encode())
    clip = mini_clip().eval().requires_grad_(False)  # mini's: frozen, as FLUX.1's CLIP-L is
    t5_tok = t5_tokenizer(out / "tokenizer_2")
    transformer, t5 = make_transformer().train(), make_t5(len(t5_tok)).train()
    # σ of the scheduler's 1,000 training steps (shift 1), drawn logit-normal as FLUX.1's DreamBooth script does
    objective = FlowObjective(make_scheduler().sigmas[:MINI_FLOW_SCHEDULER["num_train_timesteps"]].float())
    clip_ids, t5_ids = Captions(), Captions(t5_tok)

    def step_fn(step: int, scenes: list) -> torch.Tensor:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # σ, noise, drops: the same on a resume
        with torch.no_grad():
            z = vae.encode(pixels([s.image for s in scenes])).latent_dist.sample(generator=g)
            z = (z - stats["shift_factor"]) * stats["scaling_factor"]
        drop = (torch.rand(len(scenes), generator=g) < 0.1).tolist()  # empty captions: the unconditional model
        captions = ["" if d else s.caption for s, d in zip(scenes, drop)]
        cond = FLUX.encode([clip, t5], [clip_ids(captions), t5_ids(captions, T5_MAX_LENGTH)])
        noise = torch.randn(z.shape, generator=g)
        t = objective.timesteps([(len(scenes), tuple(z.shape[-2:]))], g)
        pred = FLUX.denoise(transformer, objective.noisy(z, noise, t), t, cond)
        return F.mse_loss(pred.float(), objective.target(z, noise, t).float())

    def draw(step: int, emas: dict) -> None:
        """A sample grid of the EMA weights (the ones shipped), then back to the trained ones."""
        parts = {"transformer": transformer, "text_encoder_2": t5}
        for name, e in emas.items():
            e.store(parts[name].parameters())
            e.copy_to(parts[name].parameters())
        transformer.eval(), t5.eval()
        try:
            pipe = flux_pipeline(transformer, t5, t5_tok, vae, text_encoder=clip)
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                write_sample_grid(pipe, sample_prompts(), out / "samples" / f"step-{step:05d}.png")
        finally:
            for name, e in emas.items():
                e.restore(parts[name].parameters())
            transformer.train(), t5.train()

    train_loop(cfg, out, {"transformer": transformer, "text_encoder_2": t5}, step_fn,
               ema=("transformer", "text_encoder_2"), warmup=200, after_checkpoint=draw)


def stage_flow_ship(cfg: PretrainConfig, out: Path) -> None:
    """OUT/model: what mini-flow trained (transformer, T5 and its tokenizer; fp16 safetensors of the EMA weights);
    OUT/recipe.json. `boothkit.models.mini_flow.assemble` makes the FluxPipeline folder of them with mini's frozen
    CLIP and VAE (which would otherwise ship twice); its version is the hash of recipe.json."""
    flow = Path(cfg.work_dir) / "flow"
    t5_tok = t5_tokenizer(flow / "tokenizer_2")
    transformer, t5 = make_transformer(), make_t5(len(t5_tok))
    step = load_stage(flow, {"transformer": transformer, "text_encoder_2": t5})
    transformer.to(torch.float16).save_pretrained(out / "model" / "transformer", safe_serialization=True)
    t5.to(torch.float16).save_pretrained(out / "model" / "text_encoder_2", safe_serialization=True)
    t5_tok.save_pretrained(out / "model" / "tokenizer_2")
    recipe = {"name": MINI_FLOW, "seed": cfg.seed, "steps": step, "recipe": RECIPE["flow"],
              "latents": json.loads((flow / "latents.json").read_text()), "transformer": TRANSFORMER, "t5": T5,
              "t5_max_length": T5_MAX_LENGTH, "scheduler": MINI_FLOW_SCHEDULER, "resolution": 64,
              "guidance": SAMPLE_GUIDANCE}
    atomic_write_bytes(out / "recipe.json", json.dumps(recipe, indent=2).encode())
    atomic_write_bytes(Path(cfg.work_dir) / "flow-curves.png", plot_curves(Path(cfg.work_dir), names=("flow",)))
