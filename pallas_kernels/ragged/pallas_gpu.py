"""Pallas GPU (Triton lowering) grouped matmul, interpret-testable on CPU.

Why a kernel and not XLA's ``ragged_dot`` on GPU: with jaxlib 0.10.x on CUDA, ``ragged_dot``
is expanded into a dense dot over zero-padded groups (marin-community/marin#7012 measured
23 TF/s on a B200 vs about 400-860 TF/s for a Pallas-Triton grouped GEMM at the same shape);
the cuDNN grouped path is behind a flag and crashed there. Not measured here (no GPU): time
it with ``benchmarks/moe.py``-style shapes before trusting the default.

gmm: one program per (visit, N tile) from ``metadata.tile_metadata``; each visit loads its
row tile, loops over K, and stores only its group's rows (masked store). Visits of different
groups to the same tile write disjoint rows, so programs may run in any order. tgmm: one
program per (group, K tile, N tile) that loops over the group's row tiles with masked loads.
Triton needs power-of-two tiles of at least 16 for ``pl.dot``; interpret mode accepts any.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged.metadata import group_bounds, pad_to, round_up, tile_metadata
from pallas_kernels.ragged.pallas_tpu import Tiling
from pallas_kernels.ragged.vjp import RaggedMatmul, make_ragged_matmul

DEFAULT_TILING: Tiling = (64, 64, 64)


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else interpret


def _fit(tile: int, dim: int) -> int:
    """Shrink a tile for a small dim to the next power of two, at least 16 (Triton dots)."""
    return min(tile, max(16, 1 << max(dim - 1, 0).bit_length()))


def gmm(
    x_mk: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    transpose_rhs: bool,
    out_dtype: np.dtype,
    *,
    tiling: Tiling = DEFAULT_TILING,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    m, k = x_mk.shape
    g = w.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    tm, tk, tn = _fit(tiling[0], m), _fit(tiling[1], k), _fit(tiling[2], n)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    x_mk = pad_to(x_mk, (mp, kp))
    w = pad_to(w, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    meta = tile_metadata(group_sizes, m=m, m_pad=mp, tm=tm, tail_group=True, visit_empty=False)
    compute_dtype = jnp.promote_types(x_mk.dtype, w.dtype)

    def kernel(gids_ref, mtiles_ref, offsets_ref, nact_ref, x_ref, w_ref, o_ref):
        i, n_i = pl.program_id(0), pl.program_id(1)

        @pl.when(i < nact_ref[0])
        def _visit():
            gid = gids_ref[i]
            row0 = mtiles_ref[i] * tm
            g_w = jnp.minimum(gid, g - 1)
            cols = pl.ds(n_i * tn, tn)

            def k_step(k_i, acc):
                ks = pl.ds(k_i * tk, tk)
                x_blk = plgpu.load(x_ref.at[pl.ds(row0, tm), ks]).astype(compute_dtype)
                if transpose_rhs:
                    w_blk = plgpu.load(w_ref.at[g_w, cols, ks]).astype(compute_dtype)
                    return acc + plgpu.dot(x_blk, w_blk, trans_b=True)
                w_blk = plgpu.load(w_ref.at[g_w, ks, cols]).astype(compute_dtype)
                return acc + plgpu.dot(x_blk, w_blk)

            # The tail group (gid == g) runs no K steps and stores zeros. Both branches are
            # int32 arrays: with Python ints, Pallas' Triton lowering typed them i1, which the
            # scf.for verifier rejects (and which would truncate kp // tk to 0 steps).
            k_steps = jnp.where(gid < g, jnp.int32(kp // tk), jnp.int32(0))
            acc = jax.lax.fori_loop(0, k_steps, k_step, jnp.zeros((tm, tn), jnp.float32))
            rows = row0 + jnp.arange(tm, dtype=jnp.int32)
            mine = (rows >= offsets_ref[gid]) & (rows < offsets_ref[gid + 1])
            mask = jnp.broadcast_to(mine[:, None], (tm, tn))
            plgpu.store(o_ref.at[pl.ds(row0, tm), cols], acc.astype(out_dtype), mask=mask)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(meta.group_ids.shape[0], np_ // tn),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_interpret(interpret),
        name="ragged_gmm_gpu",
    )(meta.group_ids, meta.m_tile_ids, meta.group_offsets, meta.num_active, x_mk, w)
    return out[:m, :n]


def tgmm(
    a_mk: jax.Array,
    b_mn: jax.Array,
    group_sizes: jax.Array,
    out_dtype: np.dtype,
    *,
    tiling: Tiling = DEFAULT_TILING,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    m, k = a_mk.shape
    n = b_mn.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = _fit(tiling[0], m), _fit(tiling[1], k), _fit(tiling[2], n)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    a_mk = pad_to(a_mk, (mp, kp))
    b_mn = pad_to(b_mn, (mp, np_))
    starts, ends = group_bounds(group_sizes, m)
    compute_dtype = jnp.promote_types(a_mk.dtype, b_mn.dtype)

    def kernel(starts_ref, ends_ref, a_ref, b_ref, o_ref):
        g_i, k_i, n_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = starts_ref[g_i], ends_ref[g_i]
        ks, ns = pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)

        def m_step(t, acc):
            rows = t * tm + jnp.arange(tm, dtype=jnp.int32)
            mine = ((rows >= start) & (rows < end))[:, None]
            a_blk = plgpu.load(
                a_ref.at[pl.ds(t * tm, tm), ks], mask=jnp.broadcast_to(mine, (tm, tk)), other=0.0
            )
            b_blk = plgpu.load(
                b_ref.at[pl.ds(t * tm, tm), ns], mask=jnp.broadcast_to(mine, (tm, tn)), other=0.0
            )
            return acc + plgpu.dot(a_blk.astype(compute_dtype), b_blk.astype(compute_dtype),
                                trans_a=True)

        # Empty groups run no steps and store zeros.
        first, last = start // tm, jnp.where(end > start, (end + tm - 1) // tm, start // tm)
        acc = jax.lax.fori_loop(first, last, m_step, jnp.zeros((tk, tn), jnp.float32))
        plgpu.store(o_ref.at[g_i, ks, ns], acc.astype(out_dtype))

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        grid=(g, kp // tk, np_ // tn),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_interpret(interpret),
        name="ragged_tgmm_gpu",
    )(starts, ends, a_mk, b_mn)
    return out[:, :k, :n]


def make_pallas_gpu(
    *, tiling: Tiling = DEFAULT_TILING, num_warps: int = 4, num_stages: int = 2,
    interpret: bool | None = None,
) -> RaggedMatmul:
    """A ``ragged_matmul`` implementation; ``interpret=None`` interprets off-GPU."""
    opts = dict(tiling=tiling, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return make_ragged_matmul(functools.partial(gmm, **opts), functools.partial(tgmm, **opts))


pallas_gpu_ragged_matmul = make_pallas_gpu()
