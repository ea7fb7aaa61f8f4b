"""Writing a trained run in other tools' formats (kohya/A1111 LoRA, LyCORIS, a merged diffusers folder, single file)."""
