"""Cached attention by definition: one masked softmax over [cache slots; new keys].

Materialises every score, so it is the yardstick for tests, not a fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def key_mask(kpos_bs: jax.Array, qpos_bt: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S]: query at `qpos` may see the key at `kpos` (-1 = no key there); the window
    counts keys including the query itself."""
    kp, qp = kpos_bs[:, None, :], qpos_bt[:, :, None]
    m = (kp >= 0) & (kp <= qp)
    if window is not None:
        m &= kp > qp - window
    return m


def query_positions(q_offset_b: jax.Array, b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(q_offset_b, (b,))[:, None] + jnp.arange(t, dtype=jnp.int32)


def reference_cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cache_positions: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    new_positions: jax.Array,
    *,
    q_offset: jax.Array,
    cache_length: jax.Array,
    sinks: jax.Array | None,
    window: int | None,
    scale: float,
) -> jax.Array:
    b, t, hq, dqk = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    k_all = jnp.concatenate([jnp.swapaxes(k_cache, 1, 2), k_new.astype(k_cache.dtype)], axis=1)
    v_all = jnp.concatenate([jnp.swapaxes(v_cache, 1, 2), v_new.astype(v_cache.dtype)], axis=1)
    slot_ok = jnp.arange(s)[None, :] < cache_length[:, None]
    kpos = jnp.concatenate([jnp.where(slot_ok, cache_positions, -1), new_positions], axis=1)
    mask_bts = key_mask(kpos, query_positions(q_offset, b, t), window)
    q_btkgd = q.reshape(b, t, hkv, g, dqk).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_all.astype(jnp.float32)) * scale
    scores = jnp.where(mask_bts[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, g, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - row_max)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_all.astype(jnp.float32))
    return o.reshape(b, t, hq, -1).astype(q.dtype)
