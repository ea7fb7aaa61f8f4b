"""`boothkit pretrain`: the recipe that pretrains `mini` and its evaluators on the emoji world (docs/mini.md).

Stages, each resumable from its newest checkpoint and writing its log to WORK_DIR/<stage>/log.csv:
  vae   AutoencoderKL, f=4 (64 px -> 16x16x4), L1 + a little KL
  unet  UNet2DConditionModel + CLIPTextModel from scratch on the frozen VAE's latents, epsilon prediction,
        min-SNR-5 loss weighting, 10% empty captions (for classifier-free guidance), EMA weights
  clip  CLIPModel (ViT image tower + text tower), contrastive on scene/caption pairs: CLIP-I, CLIP-T
  dino  ViTModel trained by instance discrimination (two scenes of one emoji image are a positive pair),
        so same-name emoji of another style count as *different* subjects, as DINO's features do
  ship  fp16 safetensors of all of it: a diffusers folder and two evaluator folders
mini-flow, mini's sibling in FLUX.1's architecture (boothkit.mini.flow_stages):
  flow       FluxTransformer2DModel + a small T5 from scratch on mini's VAE latents and frozen CLIP, rectified flow
  flow-ship  a FluxPipeline folder of it
The stages and run_pretrain live in boothkit.mini.stages (torch and friends); this module is config only, so
`--help` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import opt

STAGES = ("vae", "unet", "clip", "dino", "ship", "flow", "flow-ship")
# Recipe defaults per stage: steps, batch, peak lr. Chosen from measured runs (docs/mini.md).
RECIPE = {"vae": (1200, 32, 1e-3), "unet": (4000, 64, 6e-4), "clip": (2500, 64, 1e-3), "dino": (1200, 128, 1e-3),
          "flow": (1400, 64, 5e-4)}


@dataclass(frozen=True)
class PretrainConfig:
    stage: str = opt("", "Which stage to run.", choices=STAGES, required=True)
    work_dir: str = opt("", "Folder for checkpoints, logs and sample grids of every stage.", required=True)
    ship_dir: str = opt("", "ship, flow-ship: where the shipped folders go (default WORK_DIR/<stage>).")
    seed: int = opt(0, "Seed of the scenes, the initial weights and the noise.")
    steps: int = opt(0, "Optimizer steps (0: the stage's recipe default).", min=0)
    batch_size: int = opt(0, "Scenes per step (0: the stage's recipe default).", min=0)
    learning_rate: float = opt(0.0, "Peak learning rate (0: the stage's recipe default).", min=0.0)
    checkpoint_every: int = opt(250, "Write a resumable checkpoint every N steps.", min=1)
    emoji_file: str = opt("", "An .npz of emoji (boothkit.mini.emoji.save_emoji) instead of the npm packs' world; for "
                              "smoke runs, e.g. the reference set shipped with mini.")
    threads: int = opt(0, "torch CPU threads (0: torch's default).", min=0)

    def recipe(self) -> tuple[int, int, float]:
        """(steps, batch, peak lr) of this stage: the flags where given, else the recipe's defaults."""
        steps, batch, lr = RECIPE[self.stage]
        return self.steps or steps, self.batch_size or batch, self.learning_rate or lr


PRETRAIN_SECTIONS = {"pretrain": PretrainConfig}
