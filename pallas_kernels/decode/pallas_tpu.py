"""Cached attention for TPU (Pallas, Mosaic): flash decoding over the cache with a grid step
per cache block.

Grid (batch row, KV head, tile of packed query rows, cache block). The per-row
`cache_length` and `q_offset` are scalar-prefetched: a block at or past the row's length
runs no compute and its index map repeats the last needed block, so no DMA is issued for it
(a global cache of max_len slots costs only its filled part). Slots are masked by their
explicit positions (ring buffers are not in position order); the online softmax state lives
in VMEM scratch across the block axis. The output is normalised over the cache's keys with
its log-sum-exp; XLA merges it with the new chunk's keys and the sinks (`xla.merge`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode.layout import cdiv, pack_rows, unpack_rows
from pallas_kernels.decode.xla import merge, new_part

NEG = -0.7 * float(np.finfo(np.float32).max)
LANES = 128
SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_rows: int = 128  # packed query rows per tile (a multiple of 8)
    block_k: int = 512  # cache slots per grid step (a multiple of 128, or the whole cache)


def _block_k(s: int, want: int) -> int:
    """A block that tiles S legally: S itself, or a multiple of 128 dividing S."""
    if s <= want:
        return s
    for bk in range(want - want % LANES, 0, -LANES):
        if s % bk == 0:
            return bk
    return s


def _kernel(qoff_ref, len_ref, q_ref, k_ref, v_ref, kpos_ref, o_ref, lse_ref, m_scr, l_scr,
            acc_scr, *, g, block_r, block_k, s, window, scale):
    b, r, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = jnp.minimum(len_ref[b], s)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _step():
        scores = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        rows = r * block_r + jax.lax.broadcasted_iota(jnp.int32, (block_r, 1), 0)
        # Row t*G + j holds query t: t = floor((row + 0.5) / G), exact in float32 (rows < 2^23)
        # and free of vector integer division.
        q_index = jnp.floor((rows.astype(jnp.float32) + 0.5) * (1.0 / g)).astype(jnp.int32)
        qpos = qoff_ref[b] + q_index
        slots = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        kpos = kpos_ref[...]  # [1, block_k]
        allowed = (kpos >= 0) & (kpos <= qpos) & (slots < length)
        if window is not None:
            allowed &= kpos > qpos - window
        scores = jnp.where(allowed, scores, NEG)
        m_prev = m_scr[:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(scores - m_new), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_new = corr * l_scr[:, :1] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_scr[...] = corr * acc_scr[...] + pv
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        denom = l_scr[:, :1]
        seen = denom > 0.0
        safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = jnp.where(seen, acc_scr[...] / safe, 0.0)
        lse = jnp.where(seen, m_scr[:, :1] + jnp.log(safe), -jnp.inf)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def cache_part(q, k_cache, v_cache, cache_positions, q_offset, cache_length, *, window, scale,
               block_sizes: BlockSizes, interpret):
    """(o [B, T, Hq, Dv] float32, lse [B, T, Hq]) of the queries over the cache alone."""
    b, t, hq, dqk = q.shape
    hkv, s, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    g = hq // hkv
    rows = t * g
    block_r = min(block_sizes.block_rows, cdiv(rows, SUBLANES) * SUBLANES)
    n_rt = cdiv(rows, block_r)
    block_k = _block_k(s, block_sizes.block_k)
    steps = s // block_k
    q_pack = pack_rows(q.astype(k_cache.dtype), hkv, n_rt * block_r)
    qoff = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    length = jnp.broadcast_to(jnp.asarray(cache_length, jnp.int32), (b,))

    def kv_map(bi, h, r, j, qoff_ref, len_ref):
        last = jnp.maximum((jnp.minimum(len_ref[bi], s) + block_k - 1) // block_k - 1, 0)
        return (bi, h, jnp.minimum(j, last), 0)

    def pos_map(bi, h, r, j, qoff_ref, len_ref):
        return (bi, 0, kv_map(bi, h, r, j, qoff_ref, len_ref)[2])

    def q_map(bi, h, r, j, qoff_ref, len_ref):
        return (bi, h, r, 0)

    kernel = functools.partial(_kernel, g=g, block_r=block_r, block_k=block_k, s=s,
                               window=window, scale=scale)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, n_rt, steps),
            in_specs=[pl.BlockSpec((None, None, block_r, dqk), q_map),
                      pl.BlockSpec((None, None, block_k, dqk), kv_map),
                      pl.BlockSpec((None, None, block_k, dv), kv_map),
                      pl.BlockSpec((None, 1, block_k), pos_map)],
            out_specs=[pl.BlockSpec((None, None, block_r, dv), q_map),
                       pl.BlockSpec((None, None, block_r, LANES), q_map)],
            scratch_shapes=[pltpu.VMEM((block_r, LANES), jnp.float32),
                            pltpu.VMEM((block_r, LANES), jnp.float32),
                            pltpu.VMEM((block_r, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, n_rt * block_r, dv), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, n_rt * block_r, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="cached_attention_tpu",
    )(qoff, length, q_pack, k_cache, v_cache, cache_positions.astype(jnp.int32)[:, None, :])
    return [(unpack_rows(o, t, g), unpack_rows(lse[..., 0], t, g))]


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_sizes", "interpret"))
def pallas_tpu_cached_attention(
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
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
) -> jax.Array:
    """See `pallas_kernels.decode.cached_attention`. `interpret`: None = only on CPU."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    parts = cache_part(q, k_cache, v_cache, cache_positions, q_offset, cache_length,
                       window=window, scale=scale, block_sizes=block_sizes, interpret=interpret)
    parts.append(new_part(q, k_new, v_new, new_positions, q_offset, window=window, scale=scale))
    return merge(parts, sinks, q.dtype)
