"""Writing a trained run in other tools' formats (formats: kohya/A1111 and ComfyUI LoRA, LyCORIS, a merged diffusers
folder or single file; flow: Flux.1 and SD3 LoRAs in kohya's / ComfyUI's layout) and the key-naming tables those
formats need (naming)."""
