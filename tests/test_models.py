"""The built-in tiny model: deterministic, a standard diffusers folder, the real CLIP tokenizer; load errors."""
import pytest
import torch
from safetensors.torch import load_file

from boothkit.core.errors import ModelError
from boothkit.models.tiny import build_tiny_model
from boothkit.models.loading import load_pipeline, model_ref, native_resolution

PROMPTS = ["a photo of sks dog", "an image of [ktn] girl on the moon", "A RED cube-shaped Teapot, 4k!!",
           "café über naïve 東京 🐕", "  spaces   and\ttabs "]


@pytest.mark.slow
def test_tokenizer_matches_open_clip(tiny_path):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer")
    reference = SimpleTokenizer()
    assert len(ours) == 49408
    for prompt in PROMPTS:
        expected = [reference.sot_token_id] + reference.encode(prompt) + [reference.eot_token_id]
        assert ours(prompt).input_ids == expected, prompt
    assert ours("sks").input_ids[1:-1] == [48136]


def test_tiny_model_is_deterministic(tmp_path, tiny_path):
    build_tiny_model(tmp_path / "again")
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        a, b = load_file(tiny_path / part), load_file(tmp_path / "again" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_tiny_model_loads_in_plain_diffusers(tiny_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path)
    assert native_resolution(pipe) == 64
    assert pipe.scheduler.config.prediction_type == "epsilon"
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.mkdir() or p, "no model_index.json"),
    (lambda p: (p.with_suffix(".ckpt").write_bytes(b"x"), p.with_suffix(".ckpt"))[1], "a pickle file, which can run code"),
    (lambda p: p.with_suffix(".safetensors"), "file not found"),
    (lambda p: p / "nested" / "missing", "no such file or folder"),
])
def test_load_errors_name_the_model(tmp_path, make, match):
    spec = str(make(tmp_path / "m"))
    with pytest.raises(ModelError, match=match) as exc:
        load_pipeline(spec)
    assert spec in str(exc.value) and "\n" not in str(exc.value)


def test_model_ref(tiny_path, tmp_path):
    assert model_ref("tiny") == "tiny" == model_ref(str(tiny_path))
    assert model_ref("org/model") == "org/model"
    assert model_ref(str(tmp_path)) == str(tmp_path.resolve())


def test_attention_runs_through_sdpa(tiny_path):
    """diffusers' default processor is torch's scaled_dot_product_attention (no xformers needed)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = UNet2DConditionModel.from_pretrained(tiny_path / "unet")
    assert unet.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
