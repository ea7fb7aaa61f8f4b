"""A T5-style tokenizer (a SentencePiece-like Unigram model) trained here, deterministically, for the built-in flow
models' T5 text encoders. No T5 tokenizer can be downloaded where boothkit runs offline, and `sentencepiece` is not a
dependency, so it is trained with the `tokenizers` library on the English words of the CLIP BPE vocabulary that
boothkit already reads (clip_tokenizer). Real models (FLUX.1, SD3) bring their own T5 tokenizer; this one only has
T5's layout: `<pad>` 0, `</s>` 1 (appended to every encoding), `<unk>` 2, the pieces, then 100 `<extra_id_N>`."""
from __future__ import annotations

import gzip
import re
import string
from pathlib import Path

from .clip_tokenizer import clip_bpe_vocab_file

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's
T5_PIECES = 4000  # the trained vocabulary, specials included
T5_EXTRA_IDS = 100  # T5's sentinels, last in the vocabulary in reverse order (<extra_id_0> has the highest id)
_PENALTY_STEP = 1e-4  # tokenizers' UnigramTrainer: the score step between characters it keeps unlearned
_CORPUS_WORDS = 12000  # the most frequent CLIP words: enough for whole common words, trained in well under a second


def _corpus() -> list[str]:
    """Lines of the corpus: each word of CLIP's BPE merges that is a whole lower-case word, in merge order (the
    most frequent first), repeated roughly as Zipf's law says and a quarter as often capitalized."""
    lines = gzip.decompress(clip_bpe_vocab_file().read_bytes()).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    words = [m.replace(" ", "")[:-len("</w>")] for m in lines if m.endswith("</w>")]
    words = [w for w in words if re.fullmatch("[a-z]+", w)][:_CORPUS_WORDS]
    out = []
    for rank, word in enumerate(words):
        n = 1 + 1000 // (rank + 10)
        out.append(" ".join([word] * n + [word.capitalize()] * (n // 4)))
    return out


def _canonical(vocab: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The trained pieces in an order and with scores that do not depend on the machine. The trainer sums in
    parallel chunks (scores differ in the last bits with the thread count: rounded away), and gives the characters it
    must keep but did not learn the lowest score plus 1e-4 steps in hash-set order (a different order in every
    process): single characters in that band share the lowest score. Ties sort by the piece."""
    pieces = [(p, s) for p, s in vocab if p not in T5_SPECIALS]
    low = min(s for _, s in pieces)
    band = low + _PENALTY_STEP * (sum(len(p) == 1 for p, _ in pieces) + 1)
    pieces = [(p, round(low if len(p) == 1 and s < band else s, 6)) for p, s in pieces]
    return [(p, 0.0) for p in T5_SPECIALS] + sorted(pieces, key=lambda ps: (-ps[1], ps[0]))


def train_t5_vocab() -> list[tuple[str, float]]:
    """Train the Unigram vocabulary: [(piece, log-probability)], specials first; the same on every machine."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    # T5's pre-tokenization: words split at whitespace, each starting with "▁"
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_PIECES, special_tokens=list(T5_SPECIALS), unk_token="<unk>", show_progress=False,
        max_piece_length=16, initial_alphabet=list(string.printable.strip()))  # digits, capitals, punctuation
    tok.train_from_iterator(_corpus(), trainer)
    vocab = [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    return _canonical(vocab)


def write_t5_tokenizer_files(folder: Path, model_max_length: int = 512) -> None:
    """Write tokenizer.json and tokenizer_config.json of the trained T5 tokenizer into `folder`, loadable with
    `transformers.T5TokenizerFast.from_pretrained(folder)`; `model_max_length` is saved in its config (T5's: 512)."""
    from transformers import T5TokenizerFast

    vocab = train_t5_vocab()
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=model_max_length)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
