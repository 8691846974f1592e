"""Grouped matmul that is fast on XLA:CPU: one batched matmul over per-group slots, plus a loop
over non-empty groups for the rows that do not fit.

``lax.ragged_dot`` on XLA:CPU does dense work over every group (G times the FLOPs). Here:
1. Slots: each group's first ``capacity`` rows (``default_capacity``: 1.25x the mean group
   size, when the loop's dots would be small) are gathered into [G, capacity, K] (zeros past the
   group's end) and multiplied by the weights in one batched ``einsum``. XLA:CPU spreads that
   over every core, which a loop cannot: it runs a while loop's body one op at a time, so the
   loop's small dots used one of this machine's two cores (fwd 12.9 ms on one core or two
   at M 4096, G 32, K 384, N 320; benchmarks/moe_cpu_slots.py has slots vs loop per shape).
   With balanced routing nearly every row fits.
2. Loop: rows past a group's capacity, and every row when there are no slots (the mean group
   is under 32 rows, e.g. decoding, where slots would read every expert's weight for a
   handful of rows; or the loop's dots are large enough to use every core themselves): each
   non-empty group slices its weight once and multiplies its sorted rows in blocks of
   ``block`` rows with a plain dot; a block running past the group's end is masked on store,
   so no row is padded. Trip counts are dynamic (only the blocks that exist run), while all
   shapes stay static.

Why not a batched ``einsum('gbk,gkn->gbn')`` over blocks tagged with their group (the first
design): it must gather a [K, N] weight per block ([num_blocks, K, N] in memory), and measured
here it ran 2.4x slower than the loop (0.34 s vs 0.14 s, M 32768, K = N = 512, G 64, block 128).
The slots index the weights by group instead, so nothing is gathered but the rows.
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


# Slots pay when the loop's dots are small: a dot of `default_block` rows is not split over
# cores. benchmarks/moe_cpu_slots.py: 1.1-1.7x fwd+bwd at loop dots of 2.0M-7.9M
# multiply-adds; forced on at 33.6M (8192, 256, 1024, 1024 and 32768, 64, 512, 512) slots
# measured 0.83x and 0.84x.
LARGE_DOT_MACS = 1 << 24  # a loop dot this large uses every core itself: no slots


def default_capacity(m: int, num_groups: int, k: int, n: int) -> int:
    """Rows per group in the batched part: 1.25x the mean group size (rounded up to 8), or 0
    (the loop alone) when the loop's dots would be large enough to use every core themselves
    (``default_block`` x K x N of LARGE_DOT_MACS or more) or the mean group has under 32 rows
    (decoding, small batches: slots would read every expert's weight for a handful of rows,
    while the loop reads only the experts that have rows)."""
    mean = m / max(num_groups, 1)
    if mean < 32 or default_block(m, num_groups) * k * n >= LARGE_DOT_MACS:
        return 0
    return -(-int(1.25 * mean) // 8) * 8


def _nonempty_groups(starts: jax.Array, ends: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ids of non-empty groups (ascending, padded) and how many there are."""
    nonempty = ends > starts
    (ids,) = jnp.nonzero(nonempty, size=starts.shape[0], fill_value=0)
    return ids.astype(jnp.int32), jnp.sum(nonempty, dtype=jnp.int32)


def _row_block(a: jax.Array, row0: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
    """``b`` rows from ``row0`` (clamped to stay in bounds) and their absolute row indices."""
    row0 = jnp.clip(row0, 0, a.shape[0] - b)
    return jax.lax.dynamic_slice_in_dim(a, row0, b), row0 + jnp.arange(b, dtype=jnp.int32)


def _block_and_capacity(m: int, num_groups: int, k: int, n: int, block: int | None,
                        capacity: int | None) -> tuple[int, int]:
    """Rows per loop dot and slots per group: the given values, else the defaults."""
    b = min(block or default_block(m, num_groups), m)
    c = default_capacity(m, num_groups, k, n) if capacity is None else min(capacity, m)
    return b, c


def _to_slots(x_mk: jax.Array, starts: jax.Array, ends: jax.Array, c: int) -> jax.Array:
    """[G, c, K]: each group's first ``c`` rows, zeros past its end."""
    rows_gc = starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    valid_gc = rows_gc < ends[:, None]
    x_gck = jnp.take(x_mk, jnp.minimum(rows_gc, x_mk.shape[0] - 1), axis=0)
    return jnp.where(valid_gc[..., None], x_gck, 0)


def _from_slots(y_gcn: jax.Array, starts: jax.Array, ends: jax.Array, m: int) -> jax.Array:
    """[M, N]: row r of group g is slot r - starts[g] (zeros past the capacity or the sum)."""
    c = y_gcn.shape[1]
    rows = jnp.arange(m, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), ends.shape[0] - 1)
    slot = rows - starts[g]
    keep = (rows < ends[g]) & (slot < c)
    y_mn = y_gcn[g, jnp.clip(slot, 0, c - 1)]
    return jnp.where(keep[:, None], y_mn, 0)


def _gmm_loop(x_mk, w, starts, ends, transpose_rhs, out_dtype, b, y_mn):
    """Rows [starts[g], ends[g]) of every group into ``y_mn``, ``b`` rows per dot."""
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

    return jax.lax.fori_loop(0, count, group_body, y_mn)


def gmm(
    x_mk: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    transpose_rhs: bool,
    out_dtype: np.dtype,
    *,
    block: int | None = None,
    capacity: int | None = None,
) -> jax.Array:
    m, k = x_mk.shape
    n = w.shape[1] if transpose_rhs else w.shape[2]
    b, c = _block_and_capacity(m, w.shape[0], k, n, block, capacity)
    starts, ends = group_bounds(group_sizes, m)
    if not c:  # Rows nobody owns (past sum(group_sizes)) keep these zeros.
        return _gmm_loop(x_mk, w, starts, ends, transpose_rhs, out_dtype, b,
                         jnp.zeros((m, n), out_dtype))
    compute_dtype = jnp.promote_types(x_mk.dtype, w.dtype)
    x_gck = _to_slots(x_mk, starts, ends, c).astype(compute_dtype)
    y_gcn = jnp.einsum("gck,gnk->gcn" if transpose_rhs else "gck,gkn->gcn", x_gck,
                       w.astype(compute_dtype), preferred_element_type=jnp.float32)
    y_mn = _from_slots(y_gcn.astype(out_dtype), starts, ends, m)
    # Rows past each group's capacity (none with balanced routing): the loop.
    return _gmm_loop(x_mk, w, jnp.minimum(starts + c, ends), ends, transpose_rhs, out_dtype,
                     b, y_mn)


def _tgmm_loop(a_mk, b_mn, starts, ends, bs, out_gkn):
    """``out_gkn[g] += a_g^T @ b_g`` over rows [starts[g], ends[g]), ``bs`` rows per dot
    (summed in float32 within a group)."""
    k, n = a_mk.shape[1], b_mn.shape[1]
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
        return out_gkn.at[g].add(acc_kn.astype(out_gkn.dtype))

    return jax.lax.fori_loop(0, count, group_body, out_gkn)


def tgmm(
    a_mk: jax.Array,
    b_mn: jax.Array,
    group_sizes: jax.Array,
    out_dtype: np.dtype,
    *,
    block: int | None = None,
    capacity: int | None = None,
) -> jax.Array:
    m, k = a_mk.shape
    n = b_mn.shape[1]
    num_groups = group_sizes.shape[0]
    bs, c = _block_and_capacity(m, num_groups, k, n, block, capacity)
    starts, ends = group_bounds(group_sizes, m)
    # Empty groups are never visited and keep zeros. The loop alone writes each group once,
    # in out_dtype; after the slots it adds to their float32 sums.
    out_gkn = jnp.zeros((num_groups, k, n), out_dtype)
    if c:
        compute_dtype = jnp.promote_types(a_mk.dtype, b_mn.dtype)
        out_gkn = jnp.einsum("gck,gcn->gkn", _to_slots(a_mk, starts, ends, c).astype(compute_dtype),
                             _to_slots(b_mn, starts, ends, c).astype(compute_dtype),
                             preferred_element_type=jnp.float32)
        starts = jnp.minimum(starts + c, ends)
    return _tgmm_loop(a_mk, b_mn, starts, ends, bs, out_gkn).astype(out_dtype)


def make_cpu_bucketed(*, block: int | None = None, capacity: int | None = None) -> RaggedMatmul:
    """A ``ragged_matmul`` implementation; ``block=None`` picks ``default_block(M, G)`` and
    ``capacity=None`` ``default_capacity(M, G, K, N)`` (0: the loop alone)."""
    return make_ragged_matmul(
        functools.partial(gmm, block=block, capacity=capacity),
        functools.partial(tgmm, block=block, capacity=capacity),
    )


cpu_bucketed_ragged_matmul = make_cpu_bucketed()
