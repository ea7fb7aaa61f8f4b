"""What training adds to a model and generation loads back: LoRA-family adapters (injection, file format,
pipeline loading) and Textual Inversion embeddings."""
