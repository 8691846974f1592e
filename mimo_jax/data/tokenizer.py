"""Tokenizers: a built-in byte-level one and any Hugging Face `tokenizer.json`.

A tokenizer is described by a small JSON-able spec (recorded with every checkpoint), so that
`load_tokenizer(spec)` rebuilds exactly the tokenizer a model was trained with:
- `{"kind": "byte"}`: ids 0..255 are the UTF-8 bytes, then BOS=256, EOS=257, PAD=258;
- `{"kind": "hf", "path": ".../tokenizer.json", "bos": "<s>" | null, "eos": "</s>" | null}`.

`token_byte_lengths(tok)` gives the UTF-8 bytes each id stands for (0 for special tokens), so
scores can be reported per byte, independently of the tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    spec: dict[str, Any]
    vocab_size: int  # ids are in [0, vocab_size); the model vocabulary may be larger
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, *, parse_special: bool = False) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD; decoding drops specials and bad bytes."""

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self) -> None:
        self.spec: dict[str, Any] = {"kind": "byte"}
        self.vocab_size = 259
        self.bos_id, self.eos_id, self.pad_id = self.BOS, self.EOS, self.PAD

    def encode(self, text: str, *, parse_special: bool = False) -> np.ndarray:
        del parse_special  # no special token has a text form here
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """Any `tokenizer.json` through the `tokenizers` package (no network access needed)."""

    def __init__(self, path: str, bos: str | None = None, eos: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - tokenizers ships with transformers
            raise ImportError("the 'tokenizers' package is needed for HF tokenizers") from e
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        try:
            self._tok = _Tok.from_file(path)
            # A second copy that reads special tokens' text as plain text (see `encode`).
            self._literal = _Tok.from_file(path)
        except Exception as e:
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        self._literal.encode_special_tokens = True
        self.spec = {"kind": "hf", "path": os.path.abspath(path), "bos": bos, "eos": eos}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(bos)
        self.eos_id = self._special(eos)
        self.pad_id = None

    def _special(self, token: str | None) -> int | None:
        if token is None:
            return None
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"special token {token!r} is not in {self.spec['path']}")
        return int(idx)

    def encode(self, text: str, *, parse_special: bool = False) -> np.ndarray:
        """Ids of `text`. By default a special token's text (e.g. "<|eos|>" inside a document)
        is encoded as the characters it is made of, so data can never inject a BOS/EOS and
        `decode(encode(text)) == text` for any text. `parse_special=True` maps such text to the
        special ids, as Hugging Face does, for prompts written in a chat template."""
        tok = self._tok if parse_special else self._literal
        return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def load_tokenizer(spec: dict[str, Any] | None) -> Tokenizer:
    """The tokenizer a spec describes (None = the byte tokenizer)."""
    spec = dict(spec or {"kind": "byte"})
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not spec.get("path"):
            raise ValueError("an HF tokenizer spec needs 'path' (a tokenizer.json or its folder)")
        return HFTokenizer(spec["path"], bos=spec.get("bos"), eos=spec.get("eos"))
    raise ValueError(f"unknown tokenizer kind {kind!r} in {spec}; want 'byte' or 'hf'")


@functools.cache
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _uses_byte_level(tok_json: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for key in ("pretokenizers", "decoders") for n in node.get(key) or [])

    return has(tok_json.get("pre_tokenizer")) or has(tok_json.get("decoder"))


def _piece_bytes(piece: str, byte_level: bool) -> int:
    if byte_level:
        table = _byte_level_decoding()
        if all(c in table for c in piece):
            return len(piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 1  # SentencePiece byte fallback
    return len(piece.replace("\u2581", " ").encode("utf-8"))  # Metaspace marks a space


def token_byte_lengths(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """int32 [size or vocab_size]: UTF-8 bytes of text each token id stands for.

    Exact for the byte tokenizer and byte-level BPEs (GPT-2 style, e.g. `train_bpe_tokenizer`);
    for other vocabularies the byte length of the token's surface string (SentencePiece's
    "\u2581" counted as a space, byte-fallback tokens as one byte). Special and added
    control tokens (BOS/EOS/PAD, ...) stand for no text: 0. Ids past the tokenizer's
    vocabulary (a model vocabulary padded up) are 0.
    """
    n = tokenizer.vocab_size if size is None else int(size)
    out = np.zeros((max(n, tokenizer.vocab_size),), np.int32)
    if isinstance(tokenizer, ByteTokenizer):
        out[:256] = 1
    elif isinstance(tokenizer, HFTokenizer):
        raw = tokenizer._tok
        byte_level = _uses_byte_level(json.loads(raw.to_str()))
        specials = {
            int(i) for i, t in raw.get_added_tokens_decoder().items() if t.special
        }
        for piece, i in raw.get_vocab(with_added_tokens=True).items():
            if i not in specials:
                out[i] = _piece_bytes(piece, byte_level)
    else:  # any other object with encode/decode: decode ids one at a time
        skip = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
        for i in range(tokenizer.vocab_size):
            if i not in skip:
                out[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return out[:n]
