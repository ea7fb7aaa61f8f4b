"""Model families (SD 1.x/2.x, SDXL), loading a pipeline from any source, the built-in models (tiny, tiny-xl,
mini, sd15-shape) and their tokenizers."""
