"""Textual Inversion (Gal et al. 2022): the identifier becomes new tokens whose input embeddings are learned.

The identifier (e.g. "[ktn]") is added to every tokenizer of the model as one new token (or N: "[ktn]",
"[ktn]_1", ..., the names diffusers' `load_textual_inversion` gives multi-vector embeddings), its rows start at the
mean embedding of the class noun, and only those rows train: the gradient of every other row is masked to zero,
and with no weight decay AdamW leaves a row with zero gradient exactly as it was.

Files: `learned_embeds.safetensors` ({token: [N, dim]}, diffusers' format) for SD 1.x/2.x, and
`embeddings/<name>.safetensors` in the A1111/ComfyUI format ({"emb_params": [N, dim]}, or {"clip_l", "clip_g"}
for SDXL). `load_embeddings` puts either back into a pipeline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import BoothkitError, ConfigError
from ..core.files import atomic_write_bytes
from ..models.families import Family
from .lora import LORA_FILE

EMBEDDINGS_FILE = "learned_embeds.safetensors"
A1111_DIR = "embeddings"


@dataclass(frozen=True)
class Placeholder:
    token: str
    vectors: int = 1

    @property
    def names(self) -> list[str]:
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors)]

    def expand(self, prompt: str) -> str:
        """A prompt as the tokenizers must see it: the identifier followed by its extra vectors' tokens."""
        return prompt.replace(self.token, " ".join(self.names)) if self.vectors > 1 else prompt


def file_stem(token: str) -> str:
    """A file name for an identifier ("[ktn]" -> "ktn"), as A1111 names an embedding after its file."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


def add_placeholder(tokenizer, text_encoder, placeholder: Placeholder, init_text: str) -> list[int]:
    """Add the placeholder's tokens to one tokenizer / text encoder pair, their rows set to the mean embedding of
    `init_text` (the class noun); returns their ids."""
    added = tokenizer.add_tokens(placeholder.names)
    if added != placeholder.vectors:
        raise ConfigError(f"--token {placeholder.token!r}: the tokenizer already has it as an added token; "
                          f"choose another identifier")
    ids = tokenizer.convert_tokens_to_ids(placeholder.names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set just below
    weight = text_encoder.get_input_embeddings().weight
    init = tokenizer(init_text, add_special_tokens=False).input_ids or [tokenizer.unk_token_id]
    with torch.no_grad():
        weight[ids] = weight[init].float().mean(0).to(weight.dtype)
    return ids


def train_rows(text_encoder, ids: list[int]) -> torch.nn.Parameter:
    """Make the input embedding trainable (fp32) with every row but `ids` masked out of the gradient.

    Call it once the encoder holds the run's precision. The table becomes fp32 (master weights, as every trained
    weight is) while the frozen rest of the encoder stays in the run's precision, so its lookups are handed on in
    that precision, as peft hands a LoRA layer's output back in its base layer's dtype: an fp32 lookup would
    promote the sum with the (bf16) position embedding to fp32, and a bf16 LayerNorm takes no fp32 input on a CPU,
    autocast or not ("mixed dtype (CPU): expect parameter to have scalar type of Float")."""
    embedding = text_encoder.get_input_embeddings()
    weight = embedding.weight
    frozen = weight.dtype
    weight.data = weight.data.float()
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1)
    mask[ids] = 1.0
    weight.register_hook(lambda grad: grad * mask.to(grad))
    if frozen != torch.float32:
        embedding.register_forward_hook(lambda _module, _args, out: out.to(frozen))
    return weight


def learned(text_encoder, ids: list[int]) -> torch.Tensor:
    """The placeholder's vectors, [N, dim], fp32 on the CPU."""
    return text_encoder.get_input_embeddings().weight.detach()[ids].float().cpu().clone()


def save_embeddings(folder: Path, family: Family, placeholder: Placeholder, vectors: dict[str, torch.Tensor],
                    metadata: dict[str, str]) -> list[Path]:
    """Write the learned vectors (text encoder component -> [N, dim]) in diffusers' and A1111's formats."""
    from safetensors.torch import save


    meta = {"format": "pt", **{f"boothkit.{k}": str(v) for k, v in metadata.items()}}
    a1111 = folder / A1111_DIR / f"{file_stem(placeholder.token)}.safetensors"
    tensors = {family.embedding_keys[c]: v.contiguous() for c, v in vectors.items()}
    atomic_write_bytes(a1111, save(tensors, metadata=meta))
    written = [a1111]
    if len(vectors) == 1:  # diffusers' own format names the token; SDXL has none beyond A1111's two-key file
        atomic_write_bytes(folder / EMBEDDINGS_FILE,
                           save({placeholder.token: vectors["text_encoder"].contiguous()}, metadata=meta))
        written.insert(0, folder / EMBEDDINGS_FILE)
    return written


def embeddings_file(path: str | Path) -> Path | None:
    """The embedding file a run folder or file names (None: a folder without one)."""
    p = Path(path)
    if p.is_file():
        return p
    found = [p / EMBEDDINGS_FILE] + sorted((p / A1111_DIR).glob("*.safetensors"))
    return next((f for f in found if f.is_file()), None)


def load_embeddings(pipe, family: Family, path: str | Path, token: str) -> None:
    """Add a learned identifier (either format) to a pipeline's tokenizers and text encoders, as `token`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if "ti" not in family.methods:  # its identifier would reach the CLIP encoders only, not T5
        raise BoothkitError(f"--embedding {path}: learned embeddings are not supported for {family.label} models yet")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BoothkitError(f"--embedding {path}: not an embedding safetensors file ({exc})") from None
    keys = {v: c for c, v in family.embedding_keys.items()}
    if len(family.text_encoders) == 1 and len(state) == 1:
        parts = {"text_encoder": next(iter(state.values()))}
    else:
        parts = {keys[k]: v for k, v in state.items() if k in keys}
    if set(parts) != set(family.text_encoders):
        raise BoothkitError(f"--embedding {path}: holds {sorted(state)}, not an embedding for this model's text "
                            f"encoders ({', '.join(family.embedding_keys.get(c, c) for c in family.text_encoders)})")
    for component, tokenizer in zip(family.text_encoders, family.tokenizers):
        encoder = getattr(pipe, component)
        vectors = parts[component]
        if vectors.shape[-1] != encoder.get_input_embeddings().weight.shape[1]:
            raise BoothkitError(f"--embedding {path}: vectors of size {vectors.shape[-1]}, but the model's "
                                f"{component} takes {encoder.get_input_embeddings().weight.shape[1]}")
        pipe.load_textual_inversion(vectors.to(encoder.dtype), token=token, tokenizer=getattr(pipe, tokenizer),
                                    text_encoder=encoder)


def embedding_info(path: str | Path) -> dict[str, str]:
    """boothkit.* metadata of an embedding file (empty for files made elsewhere)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise BoothkitError(f"--embedding {path}: not an embedding safetensors file ({exc})") from None
    return {k[len("boothkit."):]: v for k, v in meta.items() if k.startswith("boothkit.")}


def run_parts(path: str | Path) -> tuple[Path | None, Path | None]:
    """(LoRA file, embedding file) a `--lora` argument names: a pivotal run folder has both, a Textual Inversion
    run folder only the embedding, a LoRA run folder or a file only the LoRA."""
    p = Path(path)
    if not p.is_dir():
        return p, None
    emb = embeddings_file(p)
    return (p if (p / LORA_FILE).is_file() or emb is None else None), emb
