"""Identifier tools: how a model's tokenizer splits an identifier, and rare single tokens to use as one.

Every Stable Diffusion family uses CLIP's BPE vocabulary (49,408 tokens): the 512 byte tokens first, then the
merges in the order they were learnt, most frequent first, so a token's id is its frequency rank. The paper
(Ruiz et al. §4.1) wants a rare token of the vocabulary as the identifier, one with a weak prior, and picks from
T5-XXL's ids 5000-10000; in CLIP's merge order the rarest tokens are the highest ids, so boothkit draws from
RARE_FROM up. A common word (a low id) already means something the model would have to unlearn.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelError, first_line
from ..core.hub_ids import LOCAL_OR_BUILT_IN, hub_error
from .loading import BUILT_IN
from .mini import tokenizer

COMMON_BELOW = 10_000  # the 10,000 most frequent merges: dog 1929, owl 9899 — words the model knows well
RARE_FROM = 40_000  # the rarest fifth of CLIP's merges: sks 48136, ohwx 47993
VOWELS = set("aeiouy")
AVOID = frozenset({"fck", "jfc"})  # profanity among the candidates: never suggested
WORD_END = "</w>"  # CLIP marks a token that ends a word


@dataclass
class TokenCheck:
    text: str
    pieces: list[tuple[str, int]]  # (token without its word-end mark, id)

    @property
    def single(self) -> bool:
        return len(self.pieces) == 1

    @property
    def rarity(self) -> str:
        """'common', 'uncommon' or 'rare', by the most frequent piece (the strongest prior)."""
        low = min(i for _, i in self.pieces)
        return "common" if low < COMMON_BELOW else "rare" if low >= RARE_FROM else "uncommon"

    @property
    def verdict(self) -> str:
        n = len(self.pieces)
        if not self.single:
            return (f"avoid: it splits into {n} tokens, each with its own meaning; a single rare token binds the "
                    f"subject best (try `boothkit token suggest`)")
        piece, i = self.pieces[0]
        if self.rarity == "common":
            return (f"avoid: {piece!r} is a common word (id {i}; ids below {COMMON_BELOW:,} are CLIP's most frequent "
                    f"tokens), so the model would have to unlearn what it means")
        if self.rarity == "uncommon":
            return f"usable: a single token, but not among the rarest (id {i}; rare is {RARE_FROM:,} and up)"
        return "good: a single rare token"


def check(tokenizer, text: str) -> TokenCheck:
    """How `tokenizer` splits `text`, with each piece's id."""
    pieces = tokenizer.tokenize(text)
    if not pieces:
        raise ModelError(f"token check: {text!r} holds nothing the tokenizer keeps")
    ids = tokenizer.convert_tokens_to_ids(pieces)
    return TokenCheck(text, [(p.removesuffix(WORD_END), int(i)) for p, i in zip(pieces, ids)])


def format_check(c: TokenCheck) -> str:
    pieces = " | ".join(f"{p} (id {i})" for p, i in c.pieces)
    count = "1 token" if c.single else f"{len(c.pieces)} tokens"
    return f"{c.text!r} -> {count}: {pieces}\nverdict: {c.verdict}"


def candidates(tokenizer) -> list[tuple[str, int]]:
    """Rare whole-word tokens of 2-3 letters with no vowel (so not an English word), each one token on its own."""
    pattern = re.compile(rf"([a-z]{{2,3}}){re.escape(WORD_END)}")
    found = []
    for tok, i in tokenizer.get_vocab().items():
        m = pattern.fullmatch(tok)
        if m and i >= RARE_FROM and not VOWELS & set(m.group(1)) and m.group(1) not in AVOID:
            found.append((m.group(1), i))
    # a token is only usable if the tokenizer gives it back whole (merges can split what the vocabulary lists)
    return sorted((w, i) for w, i in found if tokenizer.tokenize(w) == [w + WORD_END])


def suggest(tokenizer, n: int, seed: int) -> list[tuple[str, int]]:
    """`n` candidates drawn with `seed` (the same seed gives the same list)."""
    pool = candidates(tokenizer)
    if n > len(pool):
        raise ModelError(f"token suggest: -n {n} is more than the {len(pool)} candidates this tokenizer has")
    return random.Random(seed).sample(pool, n)


def load_tokenizer(model: str):
    """The (first) tokenizer of `model`, without loading its weights. The built-in models and single-file
    checkpoints use CLIP's own BPE tokenizer (every SD family's); folders and hub ids their tokenizer/."""
    from transformers import CLIPTokenizer

    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"--model {model}: no such file or folder")
    folder = str(path) if path.is_dir() else None
    if model in BUILT_IN or (folder is None and path.suffix in (".safetensors", ".ckpt")):
        return tokenizer()
    try:
        if folder is not None:
            return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except Exception as exc:  # transformers and the hub raise many types; a missing or removed id is said as such
        said = None if folder is not None else hub_error("--model", model, exc, LOCAL_OR_BUILT_IN)
        raise ModelError(said or f"--model {model}: no loadable tokenizer/ ({first_line(exc)})") from None
