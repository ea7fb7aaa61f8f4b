"""Training memory of a LoRA run on a flow-matching transformer (FLUX.1, SD3.5): an estimate, row by row, in bytes.

Exact rows (counted, not modelled): frozen transformer weights (stored elements x bytes of the base dtype, or the
quantized layout below), text encoders, VAE, LoRA weights, their gradients and optimizer states (LoRA parameters
counted on the meta model with boothkit's default targets, `published.meta_lora_model`).

Approximate rows: activations. Per transformer block, the bytes autograd saves for backward per token and per unit
of the hidden width d, read off the architecture (frozen Linears save no input; a LoRA'd one saves its input for
lora_A; LayerNorm/GELU/RMSNorm save their inputs; attention saves q, k, v, out and a log-sum-exp per head):

- fp32 (no autocast): Flux double block / SD3 joint block 13 d elements (LayerNorm in 1, modulated input of q/k/v
  1 — shared by the three LoRAs, q and k into RMSNorm 2, attention q, k, v, out 4, LayerNorm in 1, GELU in 4d),
  Flux single block 17 d (LayerNorm 1, modulated input 1, GELU 4, RMSNorm 2, attention 4, proj_out input 5d),
  SD3.5-medium's second (image-only) attention 7 d per image token; x 4 bytes.
- bf16/fp16 autocast (LoRA weights fp32): every LoRA'd Linear keeps its own 2-byte copy of its input (peft casts
  to the LoRA dtype, autocast casts back: no sharing), RMSNorm saves q and k in fp32: double/joint 36 bytes x d
  (2 + 3x2 + 2x4 + 4x2 + 2 + 2 + 8), single 44 (2 + 4x2 + 8 + 2x4 + 4x2 + 10), SD3 second attention 24.
  Quantized bases compute in bf16: the same.
- every attention adds 4 bytes x heads per token (log-sum-exp); Flux's final LayerNorm saves d x image tokens.
- tokens = (resolution/16)² image tokens (VAE /8, then 2x2 patches) + the text tokens the pipeline feeds (Flux-dev
  512 T5 tokens, schnell 256, SD3 77 + 256), times batch x 2 with prior preservation (a subject and a class image).
- gradient checkpointing (diffusers checkpoints every block): each block keeps only its inputs (d x tokens in the
  activation dtype), and the block being recomputed holds its full set again.
- backward's working memory: the gradients flowing through one block, taken as one more block's saved set.

Not counted: allocator slack and fragmentation (a CUDA caching allocator adds some percent), CUDA context and
kernels' workspaces, the VAE's and text encoders' own activations while encoding (one image / prompt at a time,
before training when cached), SD3's last block dropping its text stream (a slight overestimate). bitsandbytes
layers may keep extra state in backward. Measured on a small Flux on CPU: `benchmarks/memory_flow.py`.

Quantized base (Linear weights only; biases, norms, embeddings and buffers stay in bf16):
int8 (torchao weight-only, `Int8WeightOnlyConfig`): 1 byte per weight + one fp32 scale per output row; nf4 (bitsandbytes 4-bit, no double
quantization, its default): 0.5 byte per weight + one fp32 absmax per block of 64 = 0.5625 byte; fp8: 1 byte per
weight + one fp32 scale per tensor. Optimizer: AdamW two fp32 states per LoRA parameter; 8-bit AdamW two 1-byte
states + one fp32 absmax per block of 256 each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import published

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64, "fp8": 1.0}  # per Linear weight element, scales aside
# Saved bytes per token per unit of d, per block kind: (fp32 elements x 4, autocast bytes); see the docstring.
BLOCK_BYTES = {"double": (13 * 4, 36), "single": (17 * 4, 44), "dual_extra": (7 * 4, 24)}


@dataclass
class Facts:
    """What the estimate needs of one model: stored element counts per component, the transformer's Linear
    weights (elements, output rows, tensors), its LoRA's sum of in+out over the targeted Linears (x rank = LoRA
    parameters), and its shape: width, heads, blocks of each kind, text tokens."""
    counts: dict[str, int]
    linear_elements: int
    linear_rows: int
    linear_tensors: int
    lora_in_out: int
    width: int
    heads: int
    blocks: dict[str, int]  # 'double' (Flux double / SD3 joint), 'single' (Flux), 'dual' (SD3.5 second attention)
    text_tokens: int
    name: str = ""


def facts_of(transformer, lora_model, *, counts: dict[str, int], text_tokens: int, name: str = "") -> Facts:
    """Facts of a transformer (meta or real), `lora_model` being it (or its twin) with the LoRA injected."""
    import torch

    # the base model's Linears (a bitsandbytes Linear4bit is one too; a LoRA's own A/B layers are not counted)
    linears = [m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    modules = dict(lora_model.named_modules())
    lora_in_out = (sum(m.in_features for n, m in modules.items() if n.endswith("lora_A.default"))
                   + sum(m.out_features for n, m in modules.items() if n.endswith("lora_B.default")))
    cfg = transformer.config
    dual = len(getattr(cfg, "dual_attention_layers", ()) or ())
    single = getattr(cfg, "num_single_layers", 0)
    return Facts(counts=dict(counts), linear_elements=sum(m.in_features * m.out_features for m in linears),
                 linear_rows=sum(m.out_features for m in linears), linear_tensors=len(linears),
                 lora_in_out=lora_in_out, width=cfg.num_attention_heads * cfg.attention_head_dim,
                 heads=cfg.num_attention_heads, blocks={"double": cfg.num_layers, "single": single, "dual": dual},
                 text_tokens=text_tokens, name=name)


def hub_facts(hub_id: str) -> Facts:
    """Facts of a full-size model from its published configs (meta device: no memory)."""
    counts = published.parameter_counts(hub_id)
    lora = published.meta_lora_model(hub_id, rank=1)
    return facts_of(published.meta_model(hub_id, "transformer"), lora, counts=counts,
                    text_tokens=published.TEXT_TOKENS[hub_id], name=hub_id)


@dataclass
class Estimate:
    """Named rows in bytes; `peak` is the larger of the training step and the encoding before it."""
    rows: list[tuple[str, int, str]] = field(default_factory=list)
    train_step: int = 0
    encoding: int = 0
    title: str = ""

    @property
    def peak(self) -> int:
        return max(self.train_step, self.encoding)

    def row(self, name: str) -> int:
        return next(b for n, b, _ in self.rows if n == name)

    def table(self) -> str:
        lines = [f"**{self.title}**", "", "| row | GiB | how |", "|---|---:|---|"]
        lines += [f"| {n} | {b / GIB:.2f} | {how} |" for n, b, how in self.rows]
        lines.append(f"| **peak** | **{self.peak / GIB:.2f}** | max(training step {self.train_step / GIB:.2f}, "
                     f"encoding {self.encoding / GIB:.2f}) |")
        return "\n".join(lines)


def weight_bytes(f: Facts, base_dtype: str, quantize: str | None) -> int:
    """The frozen transformer's bytes: every stored element at the base dtype, or its Linear weights quantized."""
    total = f.counts["transformer"]
    if quantize is None:
        return total * DTYPE_BYTES[base_dtype]
    scales = {"int8": f.linear_rows * 4, "nf4": 0, "fp8": f.linear_tensors * 4}[quantize]
    rest = (total - f.linear_elements) * 2  # biases, norms, embeddings, buffers in bf16 (the compute dtype)
    return round(f.linear_elements * QUANT_BYTES[quantize]) + scales + rest


def activation_bytes(f: Facts, *, resolution: int, batch: int, autocast: bool, checkpointing: bool) -> int:
    """Saved activations of one forward of `batch` pictures at `resolution` (see the docstring's formula)."""
    col = 1 if autocast else 0
    image = (resolution // 16) ** 2
    joint = image + f.text_tokens
    lse = 4 * f.heads
    block = {"double": (BLOCK_BYTES["double"][col] * f.width + lse) * joint,
             "single": (BLOCK_BYTES["single"][col] * f.width + lse) * joint,
             "dual": (BLOCK_BYTES["dual_extra"][col] * f.width + lse) * image}
    act = 2 if autocast else 4
    largest = max(block["double"] + (block["dual"] if f.blocks["dual"] else 0),
                  block["single"] if f.blocks["single"] else 0)
    if checkpointing:  # each block's inputs, and the block being recomputed
        saved = (f.blocks["double"] + f.blocks["single"]) * f.width * joint * act + largest
    else:
        saved = sum(block[k] * n for k, n in f.blocks.items())
    final = f.width * image * act
    return batch * (saved + largest + final)  # + one block of gradients in flight


def estimate(model: str | Facts, *, resolution: int, batch_size: int = 1, rank: int = 16, base_dtype: str = "bf16",
             quantize: str | None = None, gradient_checkpointing: bool = False, cache_text: bool = True,
             cache_latents: bool = True, optimizer: str = "adamw", prior: bool = True) -> Estimate:
    """The memory of LoRA training on `model` (a hub id of `published`, or Facts); rows in bytes."""
    f = hub_facts(model) if isinstance(model, str) else model
    if quantize not in (None, *QUANT_BYTES):
        raise ValueError(f"quantize must be None or one of {sorted(QUANT_BYTES)}, not {quantize!r}")
    te_dtype = "bf16" if quantize else base_dtype
    text = sum(n for c, n in f.counts.items() if c.startswith("text_encoder")) * DTYPE_BYTES[te_dtype]
    vae = f.counts.get("vae", 0) * 4  # boothkit keeps the VAE in fp32 (the 16-channel VAE too)
    lora = f.lora_in_out * rank
    states = {"adamw": lora * 8, "adamw8bit": round(lora * 2 * (1 + 4 / 256))}[optimizer]
    pictures = batch_size * (2 if prior else 1)
    acts = activation_bytes(f, resolution=resolution, batch=pictures, checkpointing=gradient_checkpointing,
                            autocast=base_dtype != "fp32" or quantize is not None)
    weights = weight_bytes(f, base_dtype, quantize)
    wname = f"transformer weights ({quantize or base_dtype})"
    rows = [(wname, weights, f"{f.counts['transformer'] / 1e9:.3f} B stored elements"),
            ("text encoders", text, "freed before the first step (cached embeddings)" if cache_text
             else "resident while training"),
            ("VAE (fp32)", vae, "freed before the first step (cached latents)" if cache_latents
             else "resident while training"),
            ("LoRA weights (fp32)", lora * 4, f"{lora / 1e6:.1f} M parameters at rank {rank}"),
            ("LoRA gradients (fp32)", lora * 4, ""),
            (f"optimizer states ({optimizer})", states, "2 x fp32" if optimizer == "adamw" else "2 x 8-bit"),
            ("activations", acts, f"{resolution} px, {pictures} picture(s) a step, "
             f"{'checkpointed' if gradient_checkpointing else 'no checkpointing'} (approximate)")]
    train = weights + lora * 8 + states + acts + (0 if cache_text else text) + (0 if cache_latents else vae)
    encoding = (text if cache_text else 0) + (vae if cache_latents else 0)
    title = (f"{f.name} {resolution} px, batch {batch_size}{' + prior' if prior else ''}, rank {rank}, "
             f"{quantize or base_dtype}, {'checkpointing' if gradient_checkpointing else 'no checkpointing'}")
    return Estimate(rows=rows, train_step=train, encoding=encoding, title=title)


def logical_count(model) -> int:
    """Parameters of a model as its unquantized self holds them, its LoRA left out: a quantized Linear's packed
    storage (bitsandbytes' 4-bit pairs) counts as in x out weights."""
    import torch

    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    inside = {id(m.weight) for m in linear.values()}
    rest = sum(p.numel() for n, p in model.named_parameters() if id(p) not in inside and "lora_" not in n)
    return sum(m.in_features * m.out_features for m in linear.values()) + rest


def run_estimate(pipe, family, *, resolution: int, batch_size: int, rank: int, precision: str,
                 quantize: str | None, gradient_checkpointing: bool, prior: bool, cache: bool) -> Estimate | None:
    """The estimate for a loaded pipeline whose transformer already holds its LoRA (None for the UNet families,
    which this model of activations does not describe)."""
    import torch

    if family.denoiser != "transformer":
        return None
    counts = {name: logical_count(part) for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    last = len(family.tokenizers) - 1
    tokens = family.token_length(getattr(pipe, family.tokenizers[last]), last)
    facts = facts_of(pipe.transformer, pipe.transformer, counts=counts, text_tokens=tokens,
                     name=type(pipe.transformer).__name__)
    dtype = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(precision, "bf16")
    return estimate(facts, resolution=resolution, batch_size=batch_size, rank=rank, base_dtype=dtype,
                    quantize=quantize, gradient_checkpointing=gradient_checkpointing, cache_text=cache,
                    cache_latents=cache, prior=prior)
