"""Grouped matmul that is fast on XLA:CPU: a loop over non-empty groups, blocks of rows inside.

``lax.ragged_dot`` on XLA:CPU does dense work over every group (G times the FLOPs). Here each
non-empty group slices its weight once and multiplies its sorted rows in blocks of ``block``
rows with a plain dot (XLA:CPU's fast path); a block running past the group's end is masked on
store, so no row is padded or copied into a bucket layout. Trip counts are dynamic (only the
blocks that exist run), while all shapes stay static.

Why not a batched ``einsum('gbk,gkn->gbn')`` over blocks tagged with their group (the first
design): it must gather a [K, N] weight per block ([num_blocks, K, N] in memory), and measured
here it ran 2.4x slower than this loop (0.34 s vs 0.14 s, M 32768, K = N = 512, G 64, block 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged.metadata import group_bounds
from pallas_kernels.ragged.vjp import RaggedMatmul, make_ragged_matmul


def default_block(m: int, num_groups: int) -> int:
    """Rows per dot: a power of two near a quarter of the mean group size, in [32, 256].

    A group of s rows costs ceil(s / block) dots, so a block near the mean size wastes up to 2x
    on groups just above it; smaller blocks lose dot efficiency. Measured on 2 Zen 4 cores:
    mean 128 rows -> block 32 twice as fast as 128; mean 512 -> 128 best for fwd+bwd.
    """
    quarter = max(m // max(num_groups, 1) // 4, 1)
    return int(min(256, max(32, 1 << (quarter.bit_length() - 1))))


def _nonempty_groups(starts: jax.Array, ends: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ids of non-empty groups (ascending, padded) and how many there are."""
    nonempty = ends > starts
    (ids,) = jnp.nonzero(nonempty, size=starts.shape[0], fill_value=0)
    return ids.astype(jnp.int32), jnp.sum(nonempty, dtype=jnp.int32)


def _row_block(a: jax.Array, row0: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
    """``b`` rows from ``row0`` (clamped to stay in bounds) and their absolute row indices."""
    row0 = jnp.clip(row0, 0, a.shape[0] - b)
    return jax.lax.dynamic_slice_in_dim(a, row0, b), row0 + jnp.arange(b, dtype=jnp.int32)


def gmm(
    x_mk: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    transpose_rhs: bool,
    out_dtype: np.dtype,
    *,
    block: int | None = None,
) -> jax.Array:
    m = x_mk.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    b = min(block or default_block(m, w.shape[0]), m)
    starts, ends = group_bounds(group_sizes, m)
    ids, count = _nonempty_groups(starts, ends)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    compute_dtype = jnp.promote_types(x_mk.dtype, w.dtype)

    def group_body(j, y_mn):
        g = ids[j]
        w_g = w[g].astype(compute_dtype)  # sliced once per group, reused by its blocks
        start, end = starts[g], ends[g]

        def block_body(t, y_mn):
            row0 = start + t * b
            x_bk, rows = _row_block(x_mk, row0, b)
            y_bn = jax.lax.dot_general(
                x_bk.astype(compute_dtype), w_g, contract, preferred_element_type=jnp.float32
            ).astype(out_dtype)
            old_bn, _ = _row_block(y_mn, row0, b)
            mine = ((rows >= row0) & (rows < end))[:, None]
            new_bn = jnp.where(mine, y_bn, old_bn)
            return jax.lax.dynamic_update_slice_in_dim(y_mn, new_bn, rows[0], 0)

        return jax.lax.fori_loop(0, (end - start + b - 1) // b, block_body, y_mn)

    # Rows nobody owns (past sum(group_sizes)) keep these zeros.
    return jax.lax.fori_loop(0, count, group_body, jnp.zeros((m, n), out_dtype))


def tgmm(
    a_mk: jax.Array,
    b_mn: jax.Array,
    group_sizes: jax.Array,
    out_dtype: np.dtype,
    *,
    block: int | None = None,
) -> jax.Array:
    m, k = a_mk.shape
    n = b_mn.shape[1]
    num_groups = group_sizes.shape[0]
    bs = min(block or default_block(m, num_groups), m)
    starts, ends = group_bounds(group_sizes, m)
    ids, count = _nonempty_groups(starts, ends)
    compute_dtype = jnp.promote_types(a_mk.dtype, b_mn.dtype)

    def group_body(j, out_gkn):
        g = ids[j]
        start, end = starts[g], ends[g]

        def block_body(t, acc_kn):
            row0 = start + t * bs
            a_bk, rows = _row_block(a_mk, row0, bs)
            b_bn, _ = _row_block(b_mn, row0, bs)
            mine = ((rows >= row0) & (rows < end))[:, None]
            # Mask both sides so rows of other groups never leak (not even as NaN * 0).
            a_bk = jnp.where(mine, a_bk, 0).astype(compute_dtype)
            b_bn = jnp.where(mine, b_bn, 0).astype(compute_dtype)
            return acc_kn + jax.lax.dot_general(
                a_bk, b_bn, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )

        acc_kn = jax.lax.fori_loop(
            0, (end - start + bs - 1) // bs, block_body, jnp.zeros((k, n), jnp.float32)
        )
        return out_gkn.at[g].set(acc_kn.astype(out_dtype))

    # Empty groups are never visited and keep zeros.
    return jax.lax.fori_loop(0, count, group_body, jnp.zeros((num_groups, k, n), out_dtype))


def make_cpu_bucketed(*, block: int | None = None) -> RaggedMatmul:
    """A ``ragged_matmul`` implementation; ``block=None`` picks ``default_block(M, G)``."""
    return make_ragged_matmul(
        functools.partial(gmm, block=block), functools.partial(tgmm, block=block)
    )


cpu_bucketed_ragged_matmul = make_cpu_bucketed()
