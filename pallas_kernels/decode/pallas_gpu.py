"""Cached attention for GPU (Pallas, Triton lowering): split-K flash decoding over the cache.

One program per (batch row x KV head, tile of packed query rows, split of the cache slots).
A KV head's G query heads and the chunk's T queries are packed into T*G rows (row r is query
r // G of head r % G), so each cache block is read once for the whole group. The program
loops over the blocks of its split that hold anything (`cache_length`), masks each slot by
its explicit position (ring buffers are not in position order) and keeps an online softmax;
it writes its output normalised over its keys and the log-sum-exp, and XLA merges the splits,
the new chunk's keys (a few rows: plain XLA) and the sinks (`xla.merge`).

Triton wants power-of-two tiles: head dims are read in power-of-two column chunks (192 =
128 + 64), slots in blocks of `block_k` with masked loads past the end, so the cache is
never padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode.layout import cdiv, pack_rows, pow2, unpack_rows
from pallas_kernels.decode.xla import merge, new_part

NEG = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_rows: int = 64  # packed query rows per program (power of two, >= 16)
    block_k: int = 64  # cache slots per loop step (power of two, >= 16)
    splits: int | None = None  # cache splits (None: enough to fill ~128 programs)


def pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two pieces of a head dimension, largest first."""
    out, off = [], 0
    for bit in reversed(range(d.bit_length())):
        size = 1 << bit
        if d & size:
            out.append((off, size))
            off += size
    return tuple(out)


def supported(dqk: int, dv: int) -> bool:
    """Triton dots need every column chunk >= 16: head dims that are multiples of 16."""
    return dqk % 16 == 0 and dv % 16 == 0


def _kernel(qoff_ref, len_ref, q_ref, k_ref, v_ref, kpos_ref, o_ref, lse_ref, *, g, block_r,
            block_k, split_len, s, window, scale, dq_chunks, dv_chunks):
    r_tile, split = pl.program_id(1), pl.program_id(2)
    qoff = qoff_ref[0]
    rows = r_tile * block_r + jnp.arange(block_r)
    qpos = qoff + rows // g
    qs = [q_ref[:, pl.ds(c0, c)] for c0, c in dq_chunks]
    start = split * split_len
    end = jnp.minimum(jnp.minimum(start + split_len, len_ref[0]), s)
    n_blocks = jnp.maximum(end - start + block_k - 1, 0) // block_k

    def body(i, carry):
        accs, m, denom = carry
        base = start + i * block_k
        slots = base + jnp.arange(block_k)
        in_range = slots < end
        kpos = plgpu.load(kpos_ref.at[pl.ds(base, block_k)], mask=in_range, other=-1)
        scores = None
        for qc, (c0, c) in zip(qs, dq_chunks, strict=True):
            kc = plgpu.load(k_ref.at[pl.ds(base, block_k), pl.ds(c0, c)],
                            mask=in_range[:, None], other=0.0)
            part = plgpu.dot(qc, kc, trans_b=True, allow_tf32=False)
            scores = part if scores is None else scores + part
        scores = scores.astype(jnp.float32) * scale
        allowed = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None]) & in_range[None, :]
        if window is not None:
            allowed &= kpos[None, :] > qpos[:, None] - window
        scores = jnp.where(allowed, scores, NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.where(allowed, jnp.exp(scores - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        denom = corr * denom + jnp.sum(p, axis=1)
        new_accs = []
        for acc, (c0, c) in zip(accs, dv_chunks, strict=True):
            vc = plgpu.load(v_ref.at[pl.ds(base, block_k), pl.ds(c0, c)],
                            mask=in_range[:, None], other=0.0)
            pv = plgpu.dot(p.astype(vc.dtype), vc, allow_tf32=False).astype(jnp.float32)
            new_accs.append(corr[:, None] * acc + pv)
        return tuple(new_accs), m_new, denom

    accs0 = tuple(jnp.zeros((block_r, c), jnp.float32) for _, c in dv_chunks)
    m0 = jnp.full((block_r,), NEG, jnp.float32)
    accs, m, denom = jax.lax.fori_loop(0, n_blocks, body,
                                       (accs0, m0, jnp.zeros((block_r,), jnp.float32)))
    seen = denom > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
    for acc, (c0, c) in zip(accs, dv_chunks, strict=True):
        o_ref[:, pl.ds(c0, c)] = acc * inv[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)


def cache_part(q, k_cache, v_cache, cache_positions, q_offset, cache_length, *, window, scale,
               block_sizes: BlockSizes, interpret: bool):
    """(o [B, T, Hq, Dv] float32, lse [B, T, Hq]) of the queries over the cache alone."""
    b, t, hq, dqk = q.shape
    hkv, s, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    g = hq // hkv
    rows = t * g
    block_r = min(block_sizes.block_rows, max(16, pow2(rows)))
    n_rt = -(-rows // block_r)
    block_k = min(block_sizes.block_k, max(16, pow2(s)))
    splits = block_sizes.splits or max(1, min(cdiv(s, block_k), 128 // max(b * hkv * n_rt, 1)))
    split_len = cdiv(cdiv(s, splits), block_k) * block_k
    splits = cdiv(s, split_len)
    q_pack = pack_rows(q.astype(k_cache.dtype), hkv, n_rt * block_r)
    qoff = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    length = jnp.broadcast_to(jnp.asarray(cache_length, jnp.int32), (b,))
    kernel = functools.partial(
        _kernel, g=g, block_r=block_r, block_k=block_k, split_len=split_len, s=s, window=window,
        scale=scale, dq_chunks=pow2_chunks(dqk), dv_chunks=pow2_chunks(dv))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b * hkv, n_rt, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, r, j: (i // hkv,)),
            pl.BlockSpec((1,), lambda i, r, j: (i // hkv,)),
            pl.BlockSpec((None, None, block_r, dqk), lambda i, r, j: (i // hkv, i % hkv, r, 0)),
            pl.BlockSpec((None, None, s, dqk), lambda i, r, j: (i // hkv, i % hkv, 0, 0)),
            pl.BlockSpec((None, None, s, dv), lambda i, r, j: (i // hkv, i % hkv, 0, 0)),
            pl.BlockSpec((None, s), lambda i, r, j: (i // hkv, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_r, dv),
                         lambda i, r, j: (j, i // hkv, i % hkv, r, 0)),
            pl.BlockSpec((None, None, None, block_r), lambda i, r, j: (j, i // hkv, i % hkv, r)),
        ],
        out_shape=[jax.ShapeDtypeStruct((splits, b, hkv, n_rt * block_r, dv), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, hkv, n_rt * block_r), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="cached_attention_gpu",
    )(qoff, length, q_pack, k_cache, v_cache, cache_positions.astype(jnp.int32))

    return [(unpack_rows(o[i], t, g), unpack_rows(lse[i], t, g)) for i in range(splits)]


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_sizes", "interpret"))
def pallas_gpu_cached_attention(
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
