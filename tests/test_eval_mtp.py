"""Teacher-forced MTP acceptance: equal to a position-by-position numpy reference on the
model's logits, full acceptance for heads that copy the main model, the same acceptance
length `generate(..., speculative=K)` measures when the text is the model's own greedy
output, and the paper's curve recovered by the fit."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_eval_perplexity import DOCS, eval_cfg
from test_generate import PROMPTS, small_cfg
from test_speculative import copy_heads_model

from mimo_jax import MiMo
from mimo_jax.data.tokenizer import ByteTokenizer
from mimo_jax.eval import Corpus, acceptance_curve, fit_acceptance_curve, mtp_acceptance
from mimo_jax.eval.perplexity import corpus_rows
from mimo_jax.inference import generate


class CopyMainHeads(MiMo):
    """Head k (0-based) at t outputs the main hidden state at t+k+1, so its draft is the main
    model's greedy token there: every draft must be accepted."""

    def mtp_hidden_states(self, h_btd, ids_bt, positions_bt, segment_ids_bt, layout=None):
        assert layout is None  # one device: no context-parallel order to undo
        return jnp.stack([jnp.pad(h_btd[:, k + 1:], ((0, 0), (0, k + 1), (0, 0)))
                          for k in range(len(self.mtp))])


@pytest.fixture(scope="module")
def model() -> MiMo:
    """Heads that read only the token embedding guess the main model's next-token function of
    the current token: partly right, so drafts are both accepted and rejected."""
    m = MiMo(eval_cfg(), rngs=nnx.Rngs(5))
    d = m.cfg.hidden_size
    m.embed[...] = m.embed[...] * 3.0
    for head in m.mtp:
        head.eh_proj[...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0)
    return m


@nnx.jit
def _logits(model, ids, positions, segment_ids):
    out = model(ids, positions=positions, segment_ids=segment_ids)
    return out.logits, out.mtp_logits


def reference(model: MiMo, rows: list[dict], k_heads: int) -> dict:
    """Per start position (row-major, full-K positions only) and per-head rates, by loops."""
    stack = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    logits, mtp_logits = _logits(model, stack["ids"], stack["positions"], stack["segment_ids"])
    logits, mtp_logits = np.asarray(logits, np.float64), np.asarray(mtp_logits, np.float64)
    g = logits.argmax(-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -np.sum(p * np.log(np.maximum(p, 1e-300)), -1)
    acc_len, verify_ent = [], []
    match_k = [[] for _ in range(k_heads)]
    prefix_k = [[] for _ in range(k_heads)]
    cond_k = [[] for _ in range(k_heads)]
    length_k = [[] for _ in range(k_heads)]
    for b, (ids, seg) in enumerate(zip(stack["ids"], stack["segment_ids"], strict=True)):
        t_len = len(ids)
        for t in range(t_len):
            if seg[t] == 0:
                continue
            n_ok = 0
            while n_ok < k_heads and t + n_ok + 1 < t_len and seg[t + n_ok + 1] == seg[t]:
                n_ok += 1
            all_ok = True
            accepted = 0
            for k in range(1, n_ok + 1):
                hit = mtp_logits[k - 1, b, t].argmax() == g[b, t + k]
                match_k[k - 1].append(hit)
                if all_ok:
                    cond_k[k - 1].append(hit)
                all_ok = all_ok and hit
                prefix_k[k - 1].append(all_ok)
                accepted += int(all_ok)
                length_k[k - 1].append(1 + accepted)  # a K' = k round after t
            if n_ok == k_heads:
                acc_len.append(1 + accepted)
                verify_ent.append(np.mean(ent[b, t + 1:t + 1 + k_heads]))
    return {
        "accept_length": np.array(acc_len),
        "entropy": np.array(verify_ent),
        "marginal": np.array([np.mean(m) for m in match_k]),
        "conditional": np.array([np.mean(c) for c in cond_k]),
        "rate": np.array([np.mean(x) for x in prefix_k]),
        "length": np.array([np.mean(x) for x in length_k]),
    }


def test_matches_position_by_position_reference(model):
    tok = ByteTokenizer()
    rows = list(corpus_rows(Corpus(source=DOCS), tok, 24))  # documents split across rows
    ref = reference(model, rows, k_heads=2)
    res = mtp_acceptance(model, DOCS, tokenizer=tok, seq_len=24, batch_size=3)
    assert res.num_heads == 2 and res.positions == len(ref["accept_length"])
    np.testing.assert_array_equal(res.accept_length, ref["accept_length"])
    np.testing.assert_allclose(res.entropy, ref["entropy"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.marginal_rate, ref["marginal"], rtol=1e-12)
    np.testing.assert_allclose(res.conditional_rate, ref["conditional"], rtol=1e-12)
    np.testing.assert_allclose(res.acceptance_rate, ref["rate"], rtol=1e-12)
    np.testing.assert_allclose(res.acceptance_length, ref["length"], rtol=1e-12)
    np.testing.assert_allclose(res.acceptance_length[-1], ref["accept_length"].mean())
    assert 0 < res.marginal_rate[0] < 1 and 0 < res.conditional_rate[1] < 1  # both kinds
    # one head: the same first-draft statistics
    one = mtp_acceptance(model, DOCS, tokenizer=tok, num_heads=1, seq_len=24, batch_size=3)
    np.testing.assert_allclose(one.acceptance_length[0], res.acceptance_length[0])
    # batch size does not matter
    other = mtp_acceptance(model, DOCS, tokenizer=tok, seq_len=24, batch_size=5)
    np.testing.assert_array_equal(other.accept_length, res.accept_length)
    assert res.compilations <= 1 and other.compilations <= 1
    assert res.summary()["acceptance_length"] == res.acceptance_length.tolist()


def test_save_npz_round_trip(tmp_path):
    copy = CopyMainHeads(eval_cfg(), rngs=nnx.Rngs(5))
    res = mtp_acceptance(copy, DOCS, tokenizer=ByteTokenizer(), seq_len=40, batch_size=4)
    res.save_npz(str(tmp_path / "mtp.npz"))
    z = np.load(tmp_path / "mtp.npz")
    np.testing.assert_array_equal(z["accept_length"], res.accept_length)
    np.testing.assert_array_equal(z["entropy"], res.entropy)
    assert json.loads(str(z["summary"]))["num_heads"] == 2


def test_heads_that_copy_the_main_model_are_always_accepted():
    copy = CopyMainHeads(eval_cfg(), rngs=nnx.Rngs(5))
    res = mtp_acceptance(copy, DOCS, tokenizer=ByteTokenizer(), seq_len=40, batch_size=4)
    assert res.positions > 50
    np.testing.assert_array_equal(res.accept_length, 3)
    np.testing.assert_array_equal(res.marginal_rate, [1.0, 1.0])
    np.testing.assert_array_equal(res.conditional_rate, [1.0, 1.0])
    np.testing.assert_array_equal(res.acceptance_length, [2.0, 3.0])


def test_equals_generate_when_the_text_is_the_greedy_continuation():
    """Teacher forcing on the model's own greedy text is exactly what a greedy speculative
    decode does: simulate its rounds from the per-position acceptance and compare. (The
    shapes are test_speculative's, so a suite run compiles `generate` once for both.)"""
    model, k, max_new = copy_heads_model(), 3, 40
    conts = generate(model, PROMPTS, max_new_tokens=max_new + k).tokens
    texts = [p + c for p, c in zip(PROMPTS, conts, strict=True)]  # every round has K drafts
    width = max(len(t) for t in texts)
    ids = np.zeros((len(texts), width), np.int32)
    seg = np.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, :len(t)], seg[i, :len(t)] = t, 1
    res = mtp_acceptance(model, [{"ids": ids, "segment_ids": seg}], num_heads=k, batch_size=3)
    starts = np.cumsum([0] + [len(t) - k for t in texts])  # row offsets of the full-K positions
    assert res.positions == starts[-1]
    spec = generate(model, PROMPTS, max_new_tokens=max_new, speculative=k)
    assert spec.tokens == [c[:max_new] for c in conts]
    rounds = produced = 0
    for i, prompt in enumerate(PROMPTS):
        n, gen = len(prompt), 1  # the prefill yields the first token; position n is pending
        while gen < max_new:
            m = min(int(res.accept_length[starts[i] + n - 1]), max_new - gen)
            rounds, produced, n, gen = rounds + 1, produced + m, n + m, gen + m
    assert spec.acceptance_length == pytest.approx(produced / rounds, abs=1e-12)
    assert 1.5 < spec.acceptance_length < k + 1  # drafts both accepted and rejected


def test_fit_recovers_the_papers_curve():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.02, 1.5, 4000)
    y = acceptance_curve(x, 4.0, 0.58, 0.58) + rng.normal(0, 0.05, x.size)
    a, b, c = fit_acceptance_curve(x, y)
    np.testing.assert_allclose([a, b, c], [4.0, 0.58, 0.58], rtol=0.05)
    a2, b2, c2 = fit_acceptance_curve(x, y, a=4.0)
    assert a2 == 4.0
    np.testing.assert_allclose([b2, c2], [0.58, 0.58], rtol=0.03)
    with pytest.raises(ValueError, match="distinct entropies"):
        fit_acceptance_curve(np.ones(5), np.ones(5))


def test_bad_requests_are_named(model):
    with pytest.raises(ValueError, match="num_heads must be in 1..2"):
        mtp_acceptance(model, DOCS, tokenizer=ByteTokenizer(), num_heads=3)
    no_heads = MiMo(small_cfg(num_mtp_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no MTP heads"):
        mtp_acceptance(no_heads, [{"ids": np.ones((1, 8), np.int32)}])
