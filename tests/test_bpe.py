"""Byte-level BPE training: exact round trips (code whitespace, any Unicode), the requested
vocabulary with specials the pipeline uses, and exact per-token byte lengths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimo_jax.data.bpe import BOS, EOS, train_bpe, train_bpe_tokenizer
from mimo_jax.data.pipeline import packed_dataset
from mimo_jax.data.tokenizer import ByteTokenizer, load_tokenizer, token_byte_lengths

CODE = [
    "def f(x):\n    if x:\n\t\treturn x  # tab\n    return None\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "    \n\n   trailing spaces   \nnaïve café ✓ 中文 🙂\r\n",
] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    spec = train_bpe_tokenizer(CODE, path, vocab_size=300, min_frequency=1)
    assert spec == {"kind": "hf", "path": str(path), "bos": BOS, "eos": EOS}
    return load_tokenizer(spec)


def test_vocabulary_specials_and_merges(tok):
    assert tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    text = "        self.x = x\n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # merges learned: subwords, not bytes
    assert tok.decode(ids) == text
    raw = json.loads(open(tok.spec["path"]).read())
    assert raw["pre_tokenizer"]["type"] == "ByteLevel" and raw["decoder"]["type"] == "ByteLevel"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from([BOS, EOS, "<|", "|>"])),
                max_size=6).map("".join))
def test_round_trip_any_text(tok, text):
    """Every byte is in the alphabet, so text the corpus never showed encodes and decodes; a
    special token's text inside it is plain text."""
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_special_text_is_literal_unless_parsed(tok):
    """Documents cannot inject BOS/EOS; prompts in a chat template can ask for them."""
    text = f"a{EOS}b{BOS}"
    literal = tok.encode(text)
    assert tok.eos_id not in literal and tok.bos_id not in literal
    assert tok.decode(literal) == text
    parsed = list(tok.encode(text, parse_special=True))
    assert parsed.count(tok.eos_id) == 1 and parsed.count(tok.bos_id) == 1
    assert parsed[-1] == tok.bos_id
    assert list(tok.encode("plain", parse_special=True)) == list(tok.encode("plain"))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_byte_lengths_sum_to_the_texts_bytes(tok, text):
    table = token_byte_lengths(tok)
    assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_byte_lengths_specials_and_padding(tok):
    table = token_byte_lengths(tok, size=320)
    assert table.shape == (320,)
    assert table[tok.bos_id] == table[tok.eos_id] == 0 and not table[300:].any()
    assert table[2:300].min() >= 1
    byte = token_byte_lengths(ByteTokenizer())
    np.testing.assert_array_equal(byte, [1] * 256 + [0, 0, 0])


def test_pipeline_rows_decode_to_the_documents(tok):
    rows = list(packed_dataset(CODE[:3], [0, 1, 2], tok, 512, seed=None))
    ids = np.asarray(rows[0]["tokens"])
    seg = np.asarray(rows[0]["tokens_segment_ids"])
    for s, doc in enumerate(CODE[:3], start=1):
        piece = ids[seg == s]
        assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
        assert tok.decode(piece[1:-1]) == doc


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_bpe(CODE, 100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer(["", ""], tmp_path / "t.json", vocab_size=300)
    assert not (tmp_path / "t.json").exists()
