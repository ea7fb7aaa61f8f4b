"""The full-size FLUX.1 and SD3.5 transformers on the meta device from their published configs: sizes, LoRA key
lists and counts against arithmetic on the configs, and the memory estimate's exact rows."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from boothkit.models import memory, published as P

FLUX_DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_SINGLE = ("to_q", "to_k", "to_v", "proj_mlp", "proj_out")
# Published sizes (model cards), and the rounding they are given with.
PUBLISHED_B = {P.FLUX_DEV: 11.9, P.SD35_LARGE: 8.1, P.SD35_MEDIUM: 2.5}


@pytest.fixture(scope="module")
def lora_models():
    return {h: P.meta_lora_model(h, rank=16) for h in (P.FLUX_DEV, P.SD35_MEDIUM, P.SD35_LARGE)}


def lora_keys(model) -> set[str]:
    return {n.removesuffix(".lora_A.default.weight") for n, _ in model.named_parameters()
            if n.endswith(".lora_A.default.weight")}


def test_configs_say_what_the_hub_files_say():
    flux = P.config(P.FLUX_DEV, "transformer")
    assert (flux["in_channels"], flux["num_layers"], flux["num_single_layers"], flux["attention_head_dim"],
            flux["num_attention_heads"], flux["joint_attention_dim"], flux["pooled_projection_dim"]) == \
        (64, 19, 38, 128, 24, 4096, 768)
    assert flux["guidance_embeds"] and not P.config(P.FLUX_SCHNELL, "transformer")["guidance_embeds"]
    assert tuple(P.meta_model(P.FLUX_DEV, "transformer").config.axes_dims_rope) == (16, 56, 56)
    medium = P.config(P.SD35_MEDIUM, "transformer")
    assert medium["dual_attention_layers"] == list(range(13)) and medium["pos_embed_max_size"] == 384
    assert "dual_attention_layers" not in P.config(P.SD35_LARGE, "transformer")
    t5 = P.config(P.FLUX_DEV, "text_encoder_2")
    assert (t5["d_model"], t5["d_ff"], t5["num_layers"], t5["num_heads"], t5["d_kv"], t5["vocab_size"]) == \
        (4096, 10240, 24, 64, 64, 32128)


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_B))
def test_transformer_sizes_are_the_published_ones(hub_id):
    n = P.stored_count(P.meta_model(hub_id, "transformer")) / 1e9
    # within 1 %, or within the published figure's rounding (SD3.5-medium: 2.47 B is "2.5 B")
    assert abs(n - PUBLISHED_B[hub_id]) <= max(0.01 * PUBLISHED_B[hub_id], 0.05), n


def test_text_encoder_and_vae_sizes():
    counts = P.parameter_counts(P.SD35_LARGE)
    assert round(counts["text_encoder"] / 1e6) == 124  # CLIP-L text 123 M + its 768x768 projection
    assert round(counts["text_encoder_2"] / 1e6) == 695
    assert round(counts["text_encoder_3"] / 1e7) == 476  # T5-XXL encoder, one token embedding
    assert round(P.parameter_counts(P.FLUX_DEV)["text_encoder"] / 1e6) == 123
    assert round(counts["vae"] / 1e6) == 84


def test_flux_lora_keys_and_count(lora_models):
    keys = lora_keys(lora_models[P.FLUX_DEV])
    cfg = P.config(P.FLUX_DEV, "transformer")
    expected = {f"transformer_blocks.{i}.{'' if t.startswith('proj') else 'attn.'}{t}"
                for i in range(cfg["num_layers"]) for t in FLUX_DOUBLE}
    expected |= {f"single_transformer_blocks.{i}.{'' if t.startswith('proj') else 'attn.'}{t}"
                 for i in range(cfg["num_single_layers"]) for t in FLUX_SINGLE}
    assert keys == expected and "proj_out" not in keys
    d, r = cfg["num_attention_heads"] * cfg["attention_head_dim"], 16
    # rank x (in + out): double blocks 8 Linears d->d; single blocks q,k,v d->d, proj_mlp d->4d, proj_out 5d->d
    per_double, per_single = 8 * 2 * d, 3 * 2 * d + 5 * d + 6 * d
    arithmetic = r * (cfg["num_layers"] * per_double + cfg["num_single_layers"] * per_single)
    counted = sum(p.numel() for n, p in lora_models[P.FLUX_DEV].named_parameters() if "lora_" in n)
    assert counted == arithmetic == 46_694_400


@pytest.mark.parametrize("hub_id", [P.SD35_MEDIUM, P.SD35_LARGE])
def test_sd3_lora_keys_and_count(lora_models, hub_id):
    cfg = P.config(hub_id, "transformer")
    layers, dual = cfg["num_layers"], cfg.get("dual_attention_layers", [])
    expected = {f"transformer_blocks.{i}.attn.{t}" for i in range(layers)
                for t in FLUX_DOUBLE if not (t == "to_add_out" and i == layers - 1)}  # the last: context_pre_only
    expected |= {f"transformer_blocks.{i}.attn2.{t}" for i in dual for t in ("to_q", "to_k", "to_v", "to_out.0")}
    assert lora_keys(lora_models[hub_id]) == expected
    d, r = cfg["num_attention_heads"] * cfg["attention_head_dim"], 16
    assert cfg["caption_projection_dim"] == d  # every targeted Linear is d -> d
    counted = sum(p.numel() for n, p in lora_models[hub_id].named_parameters() if "lora_" in n)
    assert counted == r * 2 * d * (layers * 8 - 1 + 4 * len(dual))


@pytest.fixture(scope="module")
def flux_facts():
    return memory.hub_facts(P.FLUX_DEV)


def test_estimate_exact_rows(flux_facts):
    n = P.parameter_counts(P.FLUX_DEV)["transformer"]
    bf16 = memory.estimate(flux_facts, resolution=1024)
    assert bf16.row("transformer weights (bf16)") == 2 * n
    assert memory.estimate(flux_facts, resolution=512, base_dtype="fp32").row("transformer weights (fp32)") == 4 * n
    assert bf16.row("LoRA weights (fp32)") == 4 * 46_694_400 == bf16.row("LoRA gradients (fp32)")
    assert bf16.row("optimizer states (adamw)") == 8 * 46_694_400
    int8 = memory.estimate(flux_facts, resolution=1024, quantize="int8").row("transformer weights (int8)")
    nf4 = memory.estimate(flux_facts, resolution=1024, quantize="nf4").row("transformer weights (nf4)")
    assert 0.49 < int8 / (2 * n) < 0.52 and 0.27 < nf4 / (2 * n) < 0.30
    ckpt = memory.estimate(flux_facts, resolution=1024, gradient_checkpointing=True)
    assert ckpt.row("activations") < bf16.row("activations") / 4
    assert "| **peak** |" in bf16.table() and bf16.peak == bf16.train_step


def test_estimate_against_a_measured_step():
    """A small Flux's measured LoRA step (torch.profiler's allocations) within a generous 0.5-2x of the estimate."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory_flow

    got = memory_flow.measure("fp32", 256, False)
    est = memory.estimate(memory.Facts(**got["facts"]), resolution=256, base_dtype="fp32")
    assert 0.5 < got["measured"] / est.train_step < 2.0
