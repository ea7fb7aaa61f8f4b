"""Writing a trained run in other tools' formats (formats: kohya/A1111 and ComfyUI LoRA, LyCORIS, a merged diffusers
folder or single file) and the key-naming tables those formats need (naming)."""
