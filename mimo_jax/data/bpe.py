"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a corpus.

Byte-level means GPT-2's scheme: every UTF-8 byte is a base symbol (all 256 are in the
vocabulary, seen or not), the pre-tokenizer splits on GPT-2's regex without adding a prefix
space, and the decoder maps symbols back to bytes, so `decode(encode(text)) == text` for any
text, code indentation and tabs included. The result is a standard `tokenizer.json` that
`load_tokenizer({"kind": "hf", "path": ..., "bos": BOS, "eos": EOS})` (and transformers)
read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

BOS = "<|bos|>"
EOS = "<|eos|>"
_MIN_VOCAB = 256 + 2  # the byte alphabet and the two specials


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: tuple[str, ...] = (BOS, EOS),
    min_frequency: int = 2,
    max_token_length: int | None = 24,
):
    """A trained byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` ids (fewer
    only if the corpus runs out of pairs seen `min_frequency` times). Specials get ids 0.."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB + len(special_tokens) - 2:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs the 256 "
            f"bytes and {len(special_tokens)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        max_token_length=max_token_length,
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer)
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    seen = False
    for t in texts:
        if t:
            seen = True
            yield t
    if not seen:
        raise ValueError("cannot train a tokenizer on an empty corpus")


def train_bpe_tokenizer(
    texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 2048, **kwargs: Any
) -> dict[str, Any]:
    """Train a byte-level BPE on `texts`, save it as `path` (a tokenizer.json), and return the
    tokenizer spec training runs record: `{"kind": "hf", "path", "bos", "eos"}`."""
    path = os.fspath(path)
    tok = train_bpe(texts, vocab_size, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # never leave a half-written tokenizer.json behind
    return bpe_spec(path)


def bpe_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The spec of a tokenizer.json written by `train_bpe_tokenizer`."""
    return {"kind": "hf", "path": os.path.abspath(os.fspath(path)), "bos": BOS, "eos": EOS}
