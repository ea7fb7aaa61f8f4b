"""Drawing pictures: the generation pipeline, samplers, seeds and the parameters chunk every PNG carries."""
from .generation import generate_images, load_generation_pipeline, make_scheduler, run_generate  # noqa: F401  (public API)
