"""Cached attention in plain XLA, and the pieces the Pallas implementations share: a key set
(cache, new chunk) gives a partial softmax (output normalised over its own keys, and its
log-sum-exp); `merge` combines parts and sinks exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode.reference import key_mask, query_positions


def partial_attention(
    q_btnd: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kpos_bs: jax.Array,
    qpos_bt: jax.Array,
    *,
    window: int | None,
    scale: float,
    heads_major: bool,
) -> tuple[jax.Array, jax.Array]:
    """Queries over one key set: (o [B, T, Hq, Dv] float32 normalised over these keys,
    lse [B, T, Hq] float32, -inf where no key is visible). Keys are [B, Hkv, S, D] when
    `heads_major` (a cache), else [B, S, Hkv, D] (a projected chunk)."""
    b, t, hq, dqk = q_btnd.shape
    hkv = k.shape[1] if heads_major else k.shape[2]
    g = hq // hkv
    if jax.default_backend() == "cpu" and q_btnd.dtype != jnp.float32:
        # XLA:CPU has no bf16 x bf16 -> f32 dot for some of these layouts: compute in f32.
        q_btnd, k, v = (x.astype(jnp.float32) for x in (q_btnd, k, v))
    q_btkgd = q_btnd.reshape(b, t, hkv, g, dqk)
    kspec = "bksd" if heads_major else "bskd"
    scores = jnp.einsum(f"btkgd,{kspec}->bkgts", q_btkgd, k.astype(q_btnd.dtype),
                        preferred_element_type=jnp.float32) * scale
    mask = key_mask(kpos_bs, qpos_bt, window)[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - safe_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    vdt = v.dtype
    o = jnp.einsum(f"bkgts,{kspec}->btkgd", p.astype(vdt), v, preferred_element_type=jnp.float32)
    inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)  # [B,K,G,T,1]
    o = o * jnp.moveaxis(inv[..., 0], 3, 1)[..., None]
    lse = jnp.where(denom[..., 0] > 0, safe_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return o.reshape(b, t, hq, -1), jnp.moveaxis(lse, 3, 1).reshape(b, t, hq)


def combine(parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """One (o, lse) from partial softmaxes over disjoint key sets (exact); a row no part saw
    stays (0, -inf)."""
    if len(parts) == 1:
        return parts[0]
    m = functools.reduce(jnp.maximum, [lse for _, lse in parts])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    ws = [jnp.exp(lse - m) for _, lse in parts]
    den = sum(ws[1:], ws[0])
    o = sum((w[..., None] * o for w, (o, _) in zip(ws, parts, strict=True)),
            jnp.zeros_like(parts[0][0]))
    seen = den > 0
    return (o / jnp.where(seen, den, 1.0)[..., None],
            jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf))


def merge(parts: list[tuple[jax.Array, jax.Array]], sinks: jax.Array | None,
          out_dtype) -> jax.Array:
    """Combine partial softmaxes [(o [B,T,H,D], lse [B,T,H])] and per-head sink logits [H]
    into one attention output; rows that see nothing (no key, no sink) come back as zeros."""
    lses = [lse for _, lse in parts]
    if sinks is not None:
        lses.append(jnp.broadcast_to(sinks.astype(jnp.float32), lses[0].shape))
    m = lses[0]
    for x in lses[1:]:
        m = jnp.maximum(m, x)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    weights = [jnp.exp(x - m) for x in lses]
    denom = sum(weights[1:], weights[0])
    denom = jnp.where(denom > 0, denom, 1.0)
    out = sum((w[..., None] * o for w, (o, _) in zip(weights, parts, strict=False)),
              jnp.zeros_like(parts[0][0]))
    return (out / denom[..., None]).astype(out_dtype)


# Slots per step of the cache pass over a large cache: a chunked prefill (or a decode early
# in a long cache) reads the blocks holding its keys, not all `max_len` slots.
CACHE_BLOCK = 1024


def cache_part(q, k_cache, v_cache, cache_positions, q_offset, cache_length, *, window,
               scale, block: int | None = None):
    """[(o, lse)] of the queries over the cache alone (slots below `cache_length`), as the
    Pallas implementations' `cache_part`. A cache of more than `block` (default `CACHE_BLOCK`)
    slots is read in blocks of `block` up to the batch's longest `cache_length`, combined as
    it goes (forward only: a while loop)."""
    b, t = q.shape[:2]
    s = k_cache.shape[2]
    block = CACHE_BLOCK if block is None else block
    qpos = query_positions(q_offset, b, t)
    if s <= block:
        slot_ok = jnp.arange(s)[None, :] < cache_length[:, None]
        kpos = jnp.where(slot_ok, cache_positions, -1)
        return [partial_attention(q, k_cache, v_cache, kpos, qpos, window=window, scale=scale,
                                  heads_major=True)]

    def step(i, acc):
        # the last block may overlap the one before it: slots below i * block are done
        start = jnp.minimum(i * block, s - block)
        idx = start + jnp.arange(block)
        ok = (idx >= i * block)[None, :] & (idx[None, :] < cache_length[:, None])
        kpos = jnp.where(ok, jax.lax.dynamic_slice_in_dim(cache_positions, start, block, 1), -1)
        part = partial_attention(
            q, jax.lax.dynamic_slice_in_dim(k_cache, start, block, 2),
            jax.lax.dynamic_slice_in_dim(v_cache, start, block, 2), kpos, qpos,
            window=window, scale=scale, heads_major=True)
        return combine([acc, part])

    n_blocks = (jnp.max(jnp.minimum(cache_length, s)) + block - 1) // block
    empty = (jnp.zeros((b, t, q.shape[2], v_cache.shape[-1]), jnp.float32),
             jnp.full((b, t, q.shape[2]), -jnp.inf))
    return [jax.lax.fori_loop(0, n_blocks, step, empty)]


def new_part(q, k_new, v_new, new_positions, q_offset, *, window, scale):
    b, t = q.shape[:2]
    return partial_attention(q, k_new, v_new, new_positions, query_positions(q_offset, b, t),
                             window=window, scale=scale, heads_major=False)


def xla_cached_attention(
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
    """One softmax over the scores of [cache slots; new keys] (only the scores are joined,
    never the keys), the sinks in its denominator; fewest ops for XLA:CPU. A cache of more
    than `CACHE_BLOCK` slots is read block by block up to `cache_length` (`cache_part`)."""
    b, t, hq, dqk = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if s > CACHE_BLOCK:
        parts = cache_part(q, k_cache, v_cache, cache_positions, q_offset, cache_length,
                           window=window, scale=scale)
        parts.append(new_part(q, k_new, v_new, new_positions, q_offset, window=window,
                              scale=scale))
        return merge(parts, sinks, q.dtype)
    g = hq // hkv
    out_dtype = q.dtype
    if jax.default_backend() == "cpu" and q.dtype != jnp.float32:
        # XLA:CPU has no bf16 x bf16 -> f32 dot for some of these layouts: compute in f32.
        q, k_cache, v_cache, k_new, v_new = (
            x.astype(jnp.float32) for x in (q, k_cache, v_cache, k_new, v_new))
    qpos = query_positions(q_offset, b, t)
    slot_ok = jnp.arange(s)[None, :] < cache_length[:, None]
    mask = jnp.concatenate([key_mask(jnp.where(slot_ok, cache_positions, -1), qpos, window),
                            key_mask(new_positions, qpos, window)], axis=-1)  # [B, T, S+N]
    q_btkgd = q.reshape(b, t, hkv, g, dqk)
    scores = jnp.concatenate([
        jnp.einsum("btkgd,bksd->bkgts", q_btkgd, k_cache.astype(q.dtype),
                   preferred_element_type=jnp.float32),
        jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_new.astype(q.dtype),
                   preferred_element_type=jnp.float32),
    ], axis=-1) * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
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
    vdt = v_cache.dtype
    o = jnp.einsum("bkgts,bksd->btkgd", p[..., :s].astype(vdt), v_cache,
                   preferred_element_type=jnp.float32)
    o = o + jnp.einsum("bkgts,bskd->btkgd", p[..., s:].astype(vdt), v_new.astype(vdt),
                       preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, -1).astype(out_dtype)
