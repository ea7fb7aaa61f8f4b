"""Fine-tuning: the trainer and its loop, losses, batches, photos and sidecars, class images (prior), checkpoints, EMA.
`from boothkit.train import run_training` is the documented entry point."""
from .loop import run_training  # noqa: F401  (public API)
