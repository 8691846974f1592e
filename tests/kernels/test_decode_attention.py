"""Cached attention (`pallas_kernels.cached_attention`): every implementation against the
masked reference, with ring-buffer slot orders, per-row query offsets, partially filled global
caches, sinks, windows, GQA, rows that see nothing, and bf16; Pallas kernels interpreted."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode import IMPLEMENTATIONS, cached_attention, use_implementation
from pallas_kernels.decode.layout import pack_rows, unpack_rows
from pallas_kernels.decode.pallas_gpu import BlockSizes as GpuBlocks
from pallas_kernels.decode.pallas_gpu import pallas_gpu_cached_attention, pow2_chunks
from pallas_kernels.decode.pallas_tpu import BlockSizes as TpuBlocks
from pallas_kernels.decode.pallas_tpu import pallas_tpu_cached_attention
from pallas_kernels.decode.reference import reference_cached_attention
from pallas_kernels.decode.xla import xla_cached_attention

# Small blocks so that tiny caches span several blocks, splits and row tiles.
IMPLS = {
    "xla": xla_cached_attention,
    "pallas_gpu": functools.partial(pallas_gpu_cached_attention,
                                    block_sizes=GpuBlocks(16, 16, 2), interpret=True),
    "pallas_tpu": functools.partial(pallas_tpu_cached_attention,
                                    block_sizes=TpuBlocks(8, 128), interpret=True),
}
reference = jax.jit(reference_cached_attention, static_argnames=("window", "scale"))


def _case(seed, b, t, n, s, hq, hkv, dqk, dv, *, ring, dtype=jnp.float32):
    """A cache of S slots per row holding positions 0..q_offset-1 (a ring keeps only the last
    S, in scrambled slot order), the chunk's N new keys right after, queries at the end."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
    q_offset = rng.integers(0, 3 * s, b).astype(np.int32)
    q_offset[0] = 0  # an empty cache
    cache_pos = np.full((b, s), -1, np.int32)
    for i, off in enumerate(q_offset):
        if ring:
            held = np.arange(max(0, off - s), off)
            cache_pos[i, rng.permutation(s)[: len(held)]] = held
        else:
            cache_pos[i, : min(off, s)] = np.arange(min(off, s))
    new_off = q_offset + t - n  # the chunk's keys end with the last query
    new_pos = (new_off[:, None] + np.arange(n)).astype(np.int32)
    new_pos[new_pos < 0] = -1
    new_pos[-1, -1] = -1  # a padded key
    length = np.full(b, s, np.int32) if ring else np.minimum(q_offset, s).astype(np.int32)
    return dict(
        q=normal(b, t, hq, dqk), k_cache=normal(b, hkv, s, dqk), v_cache=normal(b, hkv, s, dv),
        cache_positions=jnp.asarray(cache_pos), k_new=normal(b, n, hkv, dqk),
        v_new=normal(b, n, hkv, dv), new_positions=jnp.asarray(new_pos),
        q_offset=jnp.asarray(q_offset), cache_length=jnp.asarray(length),
        sinks=jnp.asarray(1.5 * rng.standard_normal(hq), jnp.float32))


CASES = [  # seed, b, t, n, s, hq, hkv, dqk, dv, ring, window, sinks
    (0, 3, 1, 1, 40, 8, 2, 32, 16, False, None, True),  # plain decode, global cache
    (1, 2, 4, 4, 9, 4, 2, 24, 8, True, 9, True),  # speculative verify over a ring
    (2, 2, 1, 4, 9, 4, 4, 16, 16, True, 9, False),  # MTP draft: last query of 4 rows
    (3, 2, 6, 6, 33, 6, 1, 48, 40, False, None, False),  # a prefill chunk, MQA, odd dims
    (4, 1, 3, 3, 17, 16, 2, 32, 32, True, 5, True),  # window shorter than the ring
]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_reference(impl, case):
    seed, b, t, n, s, hq, hkv, dqk, dv, ring, window, sinks = case
    kw = _case(seed, b, t, n, s, hq, hkv, dqk, dv, ring=ring)
    if not sinks:
        kw["sinks"] = None
    want = reference(**kw, window=window, scale=dqk**-0.5)
    got = IMPLS[impl](**kw, window=window, scale=dqk**-0.5)
    assert got.shape == (b, t, hq, dv) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_xla_blocked_cache_pass_matches_reference(case, monkeypatch):
    """A cache larger than `CACHE_BLOCK` is read block by block up to `cache_length` (online
    softmax; the last block overlaps the one before when the size does not divide)."""
    import pallas_kernels.decode.xla as decode_xla

    monkeypatch.setattr(decode_xla, "CACHE_BLOCK", 8)
    seed, b, t, n, s, hq, hkv, dqk, dv, ring, window, sinks = case
    kw = _case(seed + 10, b, t, n, s, hq, hkv, dqk, dv, ring=ring)
    if not sinks:
        kw["sinks"] = None
    want = reference(**kw, window=window, scale=dqk**-0.5)
    got = jax.jit(xla_cached_attention, static_argnames=("window", "scale"))(
        **kw, window=window, scale=dqk**-0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bf16_cache(impl):
    kw = _case(7, 2, 2, 2, 24, 8, 2, 32, 32, ring=False, dtype=jnp.bfloat16)
    got = IMPLS[impl](**kw, window=None, scale=32**-0.5)
    f32 = {k: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for k, v in kw.items()}
    want = reference(**f32, window=None, scale=32**-0.5)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2)


def test_nothing_visible_gives_zeros_and_sinks_only_scale_down():
    kw = _case(3, 2, 1, 1, 8, 4, 2, 16, 16, ring=False)
    kw["cache_positions"] = jnp.full_like(kw["cache_positions"], -1)
    kw["new_positions"] = jnp.full_like(kw["new_positions"], -1)
    for name in IMPLS:
        out = IMPLS[name](**{**kw, "sinks": None}, window=None, scale=0.25)
        assert np.all(np.asarray(out) == 0.0), name
    # One visible key and a sink s: the output is v * 1 / (1 + exp(s - score)).
    kw["new_positions"] = kw["q_offset"][:, None]
    out = xla_cached_attention(**kw, window=None, scale=0.25)
    q, k, v = kw["q"], kw["k_new"], kw["v_new"]
    score = 0.25 * jnp.einsum("bnd,bnd->bn", q[:, 0], jnp.repeat(k[:, 0], 2, axis=1))
    weight = 1 / (1 + jnp.exp(kw["sinks"][None] - score))
    np.testing.assert_allclose(out[:, 0], weight[..., None] * jnp.repeat(v[:, 0], 2, axis=1),
                               rtol=1e-5, atol=1e-6)


def test_dispatch_checks_and_selection():
    kw = _case(0, 1, 1, 1, 8, 4, 2, 16, 16, ring=False)
    args = [kw[k] for k in ("q", "k_cache", "v_cache", "cache_positions", "k_new", "v_new",
                            "new_positions")]
    want = cached_attention(*args, q_offset=kw["q_offset"], cache_length=kw["cache_length"],
                            implementation="reference")
    with use_implementation("pallas_tpu"):  # interpreted on CPU
        got = cached_attention(*args, q_offset=kw["q_offset"], cache_length=kw["cache_length"])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert set(IMPLEMENTATIONS) == {"reference", "xla", "pallas_tpu", "pallas_gpu"}
    with pytest.raises(ValueError, match="not a multiple"):
        cached_attention(args[0][:, :, :3], *args[1:], q_offset=0)
    with pytest.raises(ValueError, match=r"must be \[B, Hkv, S, D\]"):
        cached_attention(args[0], jnp.swapaxes(args[1], 1, 2), *args[2:], q_offset=0)
    with pytest.raises(ValueError, match="positions"):
        cached_attention(*args[:3], args[3][:, :-1], *args[4:], q_offset=0)
    with pytest.raises(ValueError, match="unknown implementation"):
        cached_attention(*args, q_offset=0, implementation="cuda")
    with pytest.raises(ValueError, match="window"):
        cached_attention(*args, q_offset=0, window=0)


def test_row_packing_round_trips():
    x = jnp.arange(2 * 3 * 8 * 5, dtype=jnp.float32).reshape(2, 3, 8, 5)
    packed = pack_rows(x, 2, 16)  # 4 query heads per KV head, 3 queries -> 12 rows + pad
    assert packed.shape == (2, 2, 16, 5)
    np.testing.assert_array_equal(packed[1, 1, 4 * 2 + 3], x[1, 2, 4 + 3])  # t=2, head 7
    np.testing.assert_array_equal(unpack_rows(packed, 3, 4), x)
    assert pow2_chunks(192) == ((0, 128), (128, 64)) and pow2_chunks(24) == ((0, 16), (16, 8))
