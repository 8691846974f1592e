"""Cached generation: equality with the cache-free forward, sampling, static shapes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMo, ModelConfig
from mimo_jax.inference import (
    cache_bytes,
    generate,
    init_cache,
    probabilities,
    sampling_params,
    trace_counts,
    tree_bytes,
)
from mimo_jax.inference.decode import main_forward
from mimo_jax.inference.kv_cache import commit_main
from mimo_jax.model.config import AttentionSpec

WINDOW = 8


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=32, num_layers=4, intermediate_size=64,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        full_attention=AttentionSpec(4, 1, 16, 8, 5e6, 0.5, False, None),
        sliding_attention=AttentionSpec(4, 2, 16, 8, 1e4, 0.5, True, WINDOW),
        layer_types=("full", "sliding", "sliding", "sliding"),
        max_position_embeddings=512,
    )
    base.update(kw)
    return ModelConfig.tiny(**base)


@pytest.fixture(scope="module")
def model() -> MiMo:
    m = MiMo(small_cfg(), rngs=nnx.Rngs(0))
    # Sinks big enough to matter; router bias non-zero so routing is not trivially tied.
    for layer in [m.prefix_layers[0], *[h.layer for h in m.mtp]]:
        if layer.attn.sinks is not None:
            layer.attn.sinks[...] = jax.random.normal(jax.random.key(1), layer.attn.sinks.shape)
    return m


PROMPTS = [[5, 9, 2], list(range(1, 21)), [7] * 11]  # 20 > window: the ring wraps in prefill


@nnx.jit
def _last_logits(model, ids_bt, last_b):
    logits = model(ids_bt, compute_mtp=False).logits
    return jnp.take_along_axis(logits, last_b[:, None, None], axis=1)[:, 0]


def greedy_reference(model, prompts, n):
    """Greedy tokens from the cache-free forward (causal, so right-padding to 64 is harmless)."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        ids = np.zeros((len(seqs), 64), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        last = jnp.asarray([len(s) - 1 for s in seqs])
        nxt = np.asarray(jnp.argmax(_last_logits(model, jnp.asarray(ids), last), -1))
        for s, t in zip(seqs, nxt, strict=True):
            s.append(int(t))
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


def test_cached_logits_equal_full_forward(model):
    """Chunked prefill (chunks of 6 < window < prompt) then one token at a time, batch of
    different lengths: every logit equals the cache-free forward's."""
    cfg = model.cfg
    rng = np.random.default_rng(0)
    total = 30
    lengths = np.array([3, 20, 13])
    seqs = rng.integers(0, cfg.vocab_size, (3, total)).astype(np.int32)
    ref = np.asarray(model(jnp.asarray(seqs), compute_mtp=False).logits)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, ids, pos, valid, start):
        m = nnx.merge(graphdef, state)
        _, hn, pn, bn = main_forward(m, cache, ids, pos, valid, start)
        return commit_main(cfg, cache, pn, bn, pos, valid), m.lm_logits(hn)

    cache = init_cache(cfg, 3, 64)
    chunk = 6
    for s in range(0, 24, chunk):  # prefill: positions < length, right-padded rows
        pos = jnp.broadcast_to(s + jnp.arange(chunk), (3, chunk)).astype(jnp.int32)
        valid = pos < lengths[:, None]
        cache, logits = step(state, cache, jnp.asarray(seqs[:, s:s + chunk]), pos, valid,
                             jnp.full((3,), s, jnp.int32))
        got = np.asarray(logits)
        for b in range(3):
            for t in range(chunk):
                if s + t < lengths[b]:
                    np.testing.assert_allclose(got[b, t], ref[b, s + t], atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.asarray(cache.length), lengths)
    n = lengths.copy()
    while (n < total).any():  # decode, each row at its own position
        idx = np.minimum(n, total - 1)
        valid = (n < total)[:, None]
        cache, logits = step(state, cache, jnp.asarray(seqs[np.arange(3), idx][:, None]),
                             jnp.asarray(idx[:, None], jnp.int32), jnp.asarray(valid),
                             jnp.asarray(idx, jnp.int32))
        for b in range(3):
            if n[b] < total:
                np.testing.assert_allclose(np.asarray(logits)[b, 0], ref[b, n[b]],
                                           atol=2e-5, rtol=1e-5)
        n = n + (n < total)


def test_greedy_generate_matches_full_forward(model):
    out = generate(model, PROMPTS, max_new_tokens=12, prefill_chunk_size=8)
    assert out.tokens == greedy_reference(model, PROMPTS, 12)
    assert out.num_new_tokens == 36 and out.acceptance_length is None
    assert out.tokens_per_second > 0


def test_nothing_recompiles(model):
    """Different prompts, lengths (same chunk bucket), seeds, temperatures, budgets and stop
    tokens reuse the compiled prefill and decode loop."""
    generate(model, PROMPTS, max_new_tokens=12, prefill_chunk_size=8)
    before = trace_counts()
    out = generate(model, [[1, 2], list(range(30, 50)), [3] * 5], max_new_tokens=20,
                   temperature=0.7, top_k=5, top_p=0.9, seed=3, stop_tokens=[4, 5],
                   prefill_chunk_size=8, max_len=64)
    assert trace_counts() == before
    assert out.compile_seconds == 0.0


def test_stop_tokens_and_budget(model):
    ref = generate(model, PROMPTS, max_new_tokens=12).tokens
    stop = ref[1][4]
    out = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop]).tokens
    for r, o in zip(ref, out, strict=True):
        cut = r.index(stop) + 1 if stop in r else len(r)
        assert o == r[:cut]
    assert [len(x) for x in generate(model, PROMPTS, max_new_tokens=3).tokens] == [3, 3, 3]


def test_seeded_sampling(model):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = generate(model, PROMPTS, seed=1, **kw).tokens
    assert a == generate(model, PROMPTS, seed=1, **kw).tokens
    assert a != generate(model, PROMPTS, seed=2, **kw).tokens
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1).tokens == (
        generate(model, PROMPTS, max_new_tokens=10).tokens)


def test_probabilities_filters():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = np.asarray(probabilities(logits, sampling_params(1.0, top_k=2)))
    np.testing.assert_allclose(p[0], [5 / 7, 2 / 7, 0, 0, 0], rtol=1e-5)
    p = np.asarray(probabilities(logits, sampling_params(1.0, top_p=0.8)))
    np.testing.assert_allclose(p[0], np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-5)
    p = np.asarray(probabilities(logits, sampling_params(0.0)))
    np.testing.assert_array_equal(p[0], [1, 0, 0, 0, 0])
    p = np.asarray(probabilities(logits, sampling_params(2.0)))
    q = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 0.5
    np.testing.assert_allclose(p[0], q / q.sum(), rtol=1e-5)


def test_sliding_cache_memory_is_constant():
    cfg = small_cfg()
    short, long = init_cache(cfg, 2, 64, mtp_heads=3), init_cache(cfg, 2, 4096, mtp_heads=3)
    for a, b in zip(short.blocks + short.mtp, long.blocks + long.mtp, strict=True):
        assert a.k.shape == b.k.shape and a.v.shape == b.v.shape  # all sliding
        assert a.k.shape[-2] == WINDOW  # [(blocks,) B, Hkv, S, D]
    assert short.prefix[0].k.shape[2] == 64 and long.prefix[0].k.shape[2] == 4096
    # Sliding + MTP bytes are independent of length; cache_bytes agrees with real arrays.
    s1, s2 = cache_bytes(cfg, 2, 64), cache_bytes(cfg, 2, 4096)
    assert s1["sliding"] == s2["sliding"] and s1["mtp"] == s2["mtp"]
    assert s1["total"] == tree_bytes((short.prefix, short.blocks, short.mtp))
    flash = ModelConfig.flash()
    f4k, f256k = cache_bytes(flash, 1, 4096), cache_bytes(flash, 1, 262144)
    assert f4k["sliding"] == f256k["sliding"]
    assert f256k["total"] < cache_bytes(flash, 1, 262144, all_global=True)["total"] / 4


def test_bad_input(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, [list(range(1, 40))], max_len=32)
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, [[1] * 600])  # over max_position_embeddings
    with pytest.raises(ValueError, match="needs 4 MTP heads but the model has 3"):
        generate(model, PROMPTS, speculative=4)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 64]])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["hello"])
    no_mtp = MiMo(small_cfg(num_mtp_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no MTP weights"):
        generate(no_mtp, PROMPTS, speculative=1)


def _cli(argv: list[str]) -> int:
    import argparse

    from mimo_jax.commands import generate as command

    parser = argparse.ArgumentParser(prog="mimo-jax")
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_json(tmp_path, capsys):
    """`mimo-jax generate --json` on a transformers save_pretrained directory (byte tokenizer,
    MTP tensors added as released); --speculative without MTP weights is a clear error."""
    import json

    from hf_reference import random_hf_model, save_with_mtp

    hf = random_hf_model(
        vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=256,
    )
    plain_dir, mtp_dir = tmp_path / "plain", tmp_path / "mtp"
    hf.save_pretrained(plain_dir)
    save_with_mtp(hf, str(mtp_dir), 2)
    rc = _cli(["generate", "--checkpoint", str(mtp_dir), "--prompt", "hello", "--json",
               "--max-new-tokens", "6", "--speculative", "2", "--dtype", "float32"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "tokens", "acceptance_length", "tokens_per_second"}
    assert 1 <= len(out["tokens"]) <= 6 and isinstance(out["text"], str)
    assert 1.0 <= out["acceptance_length"] <= 3.0 and out["tokens_per_second"] > 0
    rc = _cli(["generate", "--checkpoint", str(plain_dir), "--prompt", "hi", "--speculative", "1"])
    assert rc == 2
    assert "no MTP weights" in capsys.readouterr().err


def test_string_prompts_parse_special_tokens(tmp_path):
    """A prompt's chat markup maps to the special ids (as in Hugging Face), after BOS."""
    from mimo_jax.data.bpe import BOS, EOS, train_bpe_tokenizer
    from mimo_jax.data.tokenizer import load_tokenizer
    from mimo_jax.inference.generate import _encode

    spec = train_bpe_tokenizer(["user: hi\nassistant: hello\n"] * 4, tmp_path / "tok.json",
                               vocab_size=280, min_frequency=1)
    tok = load_tokenizer(spec)
    (ids,) = _encode([f"hi{EOS}there"], tok, 280)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids[1:]) == "hithere"  # decoding drops specials
    assert BOS in tok.decode(tok.encode(f"x{BOS}"))  # documents keep it as text
