"""boothkit: DreamBooth for Stable Diffusion — LoRA with prior preservation, generation, export, metrics."""

__version__ = "0.1.0"
