"""Plain masked attention: the definition every other implementation is tested against.

Materialises the full [B, Hq, T, S] score matrix, so it is for tests and tiny shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    t: int,
    s: int,
    *,
    window: int | None,
    q_offset: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> jax.Array:
    """Boolean [B or 1, T, S] mask: True where query i may attend key j.

    Query i sits at absolute position ``q_offset + i``; key j at position j. ``window`` counts the
    keys a query sees including itself (None = full causal). Segment id 0 marks padding.
    """
    q_pos = jnp.reshape(q_offset, (-1, 1, 1)) + jnp.arange(t)[None, :, None]
    k_pos = jnp.arange(s)[None, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask &= same & (q_segment_ids[:, :, None] != 0)
    return mask


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None,
    window: int | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_offset: jax.Array,
    scale: float,
) -> jax.Array:
    """q [B,T,Hq,Dqk], k [B,S,Hkv,Dqk], v [B,S,Hkv,Dv] -> [B,T,Hq,Dv]; softmax in float32."""
    b, t, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    q_btkgd = q.reshape(b, t, hkv, g, q.shape[-1])
    scores_bkgts = jnp.einsum(
        "btkgd,bskd->bkgts", q_btkgd, k, preferred_element_type=jnp.float32
    ) * scale
    mask_bts = attention_mask(
        t, s, window=window, q_offset=q_offset,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, -jnp.inf)
    if sinks is None:
        row_max = jnp.max(scores_bkgts, axis=-1, keepdims=True)
    else:
        sink_11kg1 = sinks.astype(jnp.float32).reshape(1, hkv, g, 1, 1)
        row_max = jnp.maximum(jnp.max(scores_bkgts, axis=-1, keepdims=True), sink_11kg1)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked rows, no sink
    p_bkgts = jnp.exp(scores_bkgts - row_max)
    denom = jnp.sum(p_bkgts, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink_11kg1 - row_max)
    p_bkgts = p_bkgts / jnp.where(denom == 0.0, 1.0, denom)
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", p_bkgts.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
    return out_btkgd.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
