"""Perplexity / bits per byte: exact against a direct log-softmax in numpy, independent of the
batch size, compiled once, and the same from a corpus or from ready batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

from mimo_jax import AttentionSpec, MiMo, ModelConfig
from mimo_jax.data.bpe import train_bpe_tokenizer
from mimo_jax.data.pipeline import split_documents
from mimo_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from mimo_jax.eval import Corpus, perplexity
from mimo_jax.eval.perplexity import corpus_rows

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "café au lait — 中文 ✓\n\tindented\n",
    "x = [i * i for i in range(10)]\nprint(x)\n" * 3,
    "",  # empty documents are skipped
    "class A:\n    pass\n",
    "naïve 🙂 emoji\n" * 2,
]


def eval_cfg(vocab: int = 300, **kw) -> ModelConfig:
    base = dict(
        vocab_size=vocab, hidden_size=24, num_layers=3, intermediate_size=40,
        moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2,
        full_attention=AttentionSpec(2, 1, 16, 8, 5e6, 0.5, False, None),
        sliding_attention=AttentionSpec(2, 1, 16, 8, 1e4, 0.5, True, 9),
        layer_types=("full", "sliding", "sliding"), max_position_embeddings=256,
        num_mtp_layers=2,
    )
    base.update(kw)
    return ModelConfig.tiny(**base)


@pytest.fixture(scope="module")
def model() -> MiMo:
    return MiMo(eval_cfg(), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    spec = train_bpe_tokenizer(DOCS * 4, path, vocab_size=290, min_frequency=1)
    return load_tokenizer(spec)


@nnx.jit
def _logits(model, ids, positions, segment_ids):
    return model(ids, positions=positions, segment_ids=segment_ids, compute_mtp=False).logits


def reference(model: MiMo, tok, docs: list[str], seq_len: int) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, scored bytes for the byte tokenizer) with a float64
    log-softmax of the model's full logits, position by position."""
    rows = list(corpus_rows(Corpus(source=docs), tok, seq_len))
    stack = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    logits = np.asarray(_logits(model, stack["ids"], stack["positions"], stack["segment_ids"]),
                        np.float64)
    nll, count, n_bytes = 0.0, 0, 0
    for ids, seg, lg in zip(stack["ids"], stack["segment_ids"], logits, strict=True):
        m = lg.max(-1, keepdims=True)
        logp = lg - m - np.log(np.sum(np.exp(lg - m), -1, keepdims=True))
        for t in range(seq_len - 1):
            if seg[t] != 0 and seg[t + 1] == seg[t]:
                nll -= logp[t, ids[t + 1]]
                count += 1
                if isinstance(tok, ByteTokenizer):
                    n_bytes += int(ids[t + 1] < 256)
    return nll, count, n_bytes


def test_matches_numpy_log_softmax_byte_tokenizer(model):
    tok, seq_len = ByteTokenizer(), 16  # rows shorter than documents: pieces restart a row
    nll, count, n_bytes = reference(model, tok, DOCS, seq_len)
    res = perplexity(model, Corpus(source=DOCS), tokenizer=tok, seq_len=seq_len, batch_size=3)
    assert res.tokens == count and res.bytes == n_bytes
    np.testing.assert_allclose(res.nll, nll / count, rtol=1e-5)
    np.testing.assert_allclose(res.perplexity, math.exp(nll / count), rtol=1e-5)
    np.testing.assert_allclose(res.bits_per_byte, nll / math.log(2) / n_bytes, rtol=1e-5)
    assert res.compilations <= 1  # 0 when an earlier test compiled this shape


def test_bpe_bits_per_byte_counts_the_documents_bytes(model, bpe):
    """With rows long enough for whole documents every text token is scored (BOS is not,
    EOS has no bytes), so the scored bytes are exactly the documents' UTF-8 bytes."""
    res = perplexity(model, Corpus(source=DOCS), tokenizer=bpe, seq_len=256, batch_size=2)
    assert res.bytes == sum(len(d.encode("utf-8")) for d in DOCS)
    nll, count, _ = reference(model, bpe, DOCS, 256)
    assert res.tokens == count
    np.testing.assert_allclose(res.bits_per_byte, nll / math.log(2) / res.bytes, rtol=1e-5)


def test_independent_of_batch_size_and_compiled_once(model):
    tok = ByteTokenizer()
    results = [perplexity(model, DOCS, tokenizer=tok, seq_len=32, batch_size=b)
               for b in (1, 3, 7)]
    assert len({(r.tokens, r.bytes, r.rows) for r in results}) == 1
    assert results[0].rows > 7  # several batches of each size, the last one padded
    for r in results[1:]:
        np.testing.assert_allclose(r.nll, results[0].nll, rtol=1e-6)
    # one compilation per batch shape, reused by later calls on the same model structure
    assert [r.compilations for r in results] == [1, 1, 1]
    again = perplexity(model, DOCS, tokenizer=tok, seq_len=32, batch_size=3)
    assert again.compilations == 0 and again.nll == results[1].nll


def test_ready_batches_and_rows_give_the_corpus_result(model):
    tok = ByteTokenizer()
    rows = list(corpus_rows(Corpus(source=DOCS), tok, 32))
    from_corpus = perplexity(model, DOCS, tokenizer=tok, seq_len=32, batch_size=4)
    from_rows = perplexity(model, rows, tokenizer=tok, batch_size=4)
    stacked = [{k: np.stack([r[k] for r in rows[i:i + 3]]) for k in rows[0]}
               for i in range(0, len(rows), 3)]
    from_batches = perplexity(model, stacked, tokenizer=tok, batch_size=4)
    for r in (from_rows, from_batches):
        assert (r.tokens, r.bytes) == (from_corpus.tokens, from_corpus.bytes)
        np.testing.assert_allclose(r.nll, from_corpus.nll, rtol=1e-6)
    no_tok = perplexity(model, rows, batch_size=4)
    assert no_tok.bits_per_byte is None and no_tok.tokens == from_corpus.tokens


def test_max_rows_and_val_split(model):
    tok = ByteTokenizer()
    all_rows = list(corpus_rows(Corpus(source=DOCS), tok, 16))
    part = perplexity(model, DOCS, tokenizer=tok, seq_len=16, batch_size=3, max_rows=4)
    assert part.rows == 4 and len(all_rows) > 4
    val = Corpus(source=DOCS, split="val", val_fraction=0.34, seed=1)
    _, indices = val.open()
    assert indices == split_documents(len(DOCS), 0.34, 1).val


def test_bad_input_is_named(model, bpe):
    big = load_tokenizer(None)
    small = MiMo(eval_cfg(vocab=200), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokenizer has 259 ids but the model vocabulary is 200"):
        perplexity(small, DOCS, tokenizer=big)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(model, DOCS)
    a = {"ids": np.ones((2, 8), np.int32)}
    b = {"ids": np.ones((2, 6), np.int32)}
    with pytest.raises(ValueError, match="same length T"):
        perplexity(model, [a, b])
    with pytest.raises(ValueError, match="unknown split"):
        perplexity(model, Corpus(source=DOCS, split="test"), tokenizer=bpe)
