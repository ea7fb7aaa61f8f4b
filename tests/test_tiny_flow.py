"""The built-in flow models tiny-flux and tiny-sd3 (FLUX.1-dev's and SD3.5's architectures at toy size, random
weights) and the T5 tokenizer trained for them: deterministic builds, standard diffusers folders that plain diffusers
loads and draws with, and the wiring of the real models."""
import json

import numpy as np
import pytest
import torch

from boothkit.models.tiny_flow import (TINY_FLUX_VERSION, TINY_SD3_VERSION, build_tiny_flux_model,
                                       build_tiny_sd3_model, tiny_flux_model_path, tiny_sd3_model_path)

PROMPT = "a photo of sks dog"
MODELS = {"flux": ("FluxPipeline", tiny_flux_model_path, build_tiny_flux_model, TINY_FLUX_VERSION),
          "sd3": ("StableDiffusion3Pipeline", tiny_sd3_model_path, build_tiny_sd3_model, TINY_SD3_VERSION)}


@pytest.fixture(scope="module")
def pipes(one_thread):
    """Each model built (cached under BOOTHKIT_HOME) and loaded by plain diffusers from its folder."""
    import diffusers

    return {family: getattr(diffusers, cls).from_pretrained(path()) for family, (cls, path, _, _) in MODELS.items()}


def test_t5_tokenizer_has_t5s_layout_and_is_deterministic(tmp_path):
    from transformers import T5TokenizerFast

    from boothkit.models.t5_tokenizer import write_t5_tokenizer_files

    write_t5_tokenizer_files(tmp_path / "a", model_max_length=32)
    tok = T5TokenizerFast.from_pretrained(tmp_path / "a")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 32 and len(tok) == 4100
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [4099, 4000]  # as T5's, reversed
    ids = tok(PROMPT, padding="max_length", max_length=32, truncation=True).input_ids
    n = ids.index(1)
    assert len(ids) == 32 and 2 not in ids[:n] and ids[n + 1:] == [0] * (31 - n)  # no <unk>, eos, then pads
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    assert 2 not in tok("A Red Cube, 4k!").input_ids  # capitals, digits and punctuation are pieces too
    write_t5_tokenizer_files(tmp_path / "b", model_max_length=32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("family", MODELS)
def test_builds_are_byte_identical(family, tmp_path, pipes):
    """A fresh build equals the cached one file for file (weights, configs, tokenizers, marker): a changed build
    must change the version."""
    _, path, build, version = MODELS[family]
    build(tmp_path / "again")
    cached = {p.relative_to(path()): p.read_bytes() for p in sorted(path().rglob("*")) if p.is_file()}
    again = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in sorted((tmp_path / "again").rglob("*"))
             if p.is_file()}
    assert cached.keys() == again.keys() and all(cached[k] == again[k] for k in cached)
    assert sum(str(k).endswith(".safetensors") for k in cached) == (4 if family == "flux" else 5)
    assert sum(len(v) for v in cached.values()) < 15e6
    marker = json.loads(cached[next(k for k in cached if k.name == "BOOTHKIT_TINY.json")])
    assert marker["name"] == version and marker["family"] == family and marker["resolution"] == 64


@pytest.mark.parametrize("family", MODELS)
def test_plain_diffusers_draws_deterministically(family, pipes):
    pipe = pipes[family]
    extra = {"max_sequence_length": 32} if family == "flux" else {}  # Flux's default is 512, and 1024 px

    def draw(seed):
        return pipe(PROMPT, height=64, width=64, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(seed), **extra).images[0]

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_tiny_flux_has_flux_dev_wiring(pipes):
    pipe = pipes["flux"]
    t, vae = pipe.transformer, pipe.vae
    assert len(t.transformer_blocks) == t.config.num_layers == 2
    assert len(t.single_transformer_blocks) == t.config.num_single_layers == 2
    assert t.config.guidance_embeds and sum(t.config.axes_dims_rope) == t.config.attention_head_dim
    assert t.config.in_channels == 4 * vae.config.latent_channels == 64  # latents packed 2x2 into tokens
    assert t.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size != t.config.joint_attention_dim
    assert (vae.config.scaling_factor, vae.config.shift_factor, pipe.vae_scale_factor) == (0.3611, 0.1159, 8)
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    s = pipe.scheduler.config
    assert (s.shift, s.use_dynamic_shifting, s.base_shift, s.max_shift) == (3.0, True, 0.5, 1.15)
    assert (pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length) == (77, 32)
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"


def test_tiny_sd3_has_sd35_wiring(pipes):
    pipe = pipes["sd3"]
    t, vae = pipe.transformer, pipe.vae
    widths = [pipe.text_encoder.config.projection_dim, pipe.text_encoder_2.config.projection_dim]
    assert widths[0] != widths[1] and t.config.pooled_projection_dim == sum(widths)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert t.config.joint_attention_dim == pipe.text_encoder_3.config.d_model >= sum(widths)
    assert t.config.sample_size * pipe.vae_scale_factor == 64 and t.config.in_channels == vae.config.latent_channels
    assert t.config.qk_norm == "rms_norm" and t.transformer_blocks[0].attn2 is not None
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token, pipe.tokenizer_3.model_max_length) == (
        "<|endoftext|>", "!", 32)
