"""Pallas TPU grouped matmul (gmm) and its transposed form (tgmm), interpret-testable on CPU.

Grid steps follow ``metadata.tile_metadata``: a row tile shared by two groups is visited once
per group and each visit stores only its own rows (a select on the output tile), so straddling
tiles are exact. M, K and N are padded to the tiles and the result sliced back. Rows past
``sum(group_sizes)`` belong to a tail group whose visits store zeros, never NaN.

Tiles (``default_tiling``): every grid step costs ~0.35 us of fixed overhead, so K and N tiles
are as large as the generation's scoped VMEM allows (the release's 8K rows x 4096 -> 2048 with
256 experts: ~2.5K steps instead of ~164K with 128-cubed tiles), while the row tile follows
the mean group size (rows of a visited tile that belong to other groups are wasted work).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged.metadata import pad_to, round_up, tile_metadata
from pallas_kernels.ragged.vjp import RaggedMatmul, make_ragged_matmul
from pallas_kernels.tpu_generation import scoped_vmem_bytes, tpu_generation

Tiling = tuple[int, int, int]  # (rows tm, contraction tk, output columns tn)


def vmem_bytes(tiling: Tiling, itemsize: int = 2) -> dict[str, int]:
    """VMEM each kernel needs: double-buffered input and output tiles plus the float32
    accumulator. gmm: x [tm, tk], w [tk, tn], out/acc [tm, tn]; tgmm: a [tm, tk], b [tm, tn],
    out/acc [tk, tn]."""
    tm, tk, tn = tiling
    gmm_ = 2 * itemsize * (tm * tk + tk * tn + tm * tn) + 4 * tm * tn
    tgmm_ = 2 * itemsize * (tm * tk + tm * tn + tk * tn) + 4 * tk * tn
    return {"gmm": gmm_, "tgmm": tgmm_}


def grid_steps(m: int, k: int, n: int, num_groups: int, tiling: Tiling) -> int:
    """gmm grid steps: (row-tile visits, at most tiles + groups - 1) x K tiles x N tiles."""
    tm, tk, tn = tiling
    visits = -(-m // tm) + num_groups  # + the tail group
    return visits * -(-k // tk) * -(-n // tn)


def default_tiling(
    m: int, k: int, n: int, num_groups: int, *, itemsize: int = 2,
    generation: str | None = None,
) -> Tiling:
    """Tiles for one call on a TPU generation (None: sized for the smallest VMEM budget).

    Row tile: 128 while groups average under 256 rows, else 256, else 512. K / N tiles: 1024
    (2048 for K on v6e, whose scoped VMEM is twice as large), halved until both kernels fit in
    3/4 of the generation's scoped VMEM (float32 inputs need half the tile).
    """
    mean = m / max(num_groups, 1)
    tm = 128 if mean < 256 else (256 if mean < 1024 else 512)
    tk, tn = (2048 if generation == "v6e" else 1024), 1024
    budget = 3 * scoped_vmem_bytes(generation) // 4
    while max(vmem_bytes((tm, tk, tn), itemsize).values()) > budget and max(tk, tn) > 128:
        if tk >= tn:
            tk //= 2
        else:
            tn //= 2
    return tm, tk, tn


def _resolve(tiling: Tiling | None, m: int, k: int, n: int, g: int, *dtypes) -> Tiling:
    if tiling is not None:
        return tiling
    itemsize = max(jnp.dtype(d).itemsize for d in dtypes)
    return default_tiling(m, k, n, g, itemsize=itemsize, generation=tpu_generation())


def _fit(tile: int, dim: int, align: int) -> int:
    """The tile, shrunk for small dims (a whole dim rounded up to ``align``)."""
    return min(tile, round_up(dim, align))


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "tpu" if interpret is None else interpret


def gmm(
    x_mk: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    transpose_rhs: bool,
    out_dtype: np.dtype,
    *,
    tiling: Tiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """[M,K] x per-group w [G,K,N] (or [G,N,K] with ``transpose_rhs``) -> [M,N]."""
    m, k = x_mk.shape
    g = w.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    tiling = _resolve(tiling, m, k, n, g, x_mk.dtype, w.dtype, out_dtype)
    tm, tk, tn = _fit(tiling[0], m, 8), _fit(tiling[1], k, 128), _fit(tiling[2], n, 128)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    x_mk = pad_to(x_mk, (mp, kp))
    w = pad_to(w, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    meta = tile_metadata(group_sizes, m=m, m_pad=mp, tm=tm, tail_group=True, visit_empty=False)
    tiles_k = kp // tk
    compute_dtype = jnp.promote_types(x_mk.dtype, w.dtype)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(gids, mtiles, offsets, nact, x_ref, w_ref, o_ref, acc_ref):
        i, k_i = pl.program_id(1), pl.program_id(2)
        gid = gids[i]
        active = i < nact[0]

        @pl.when(k_i == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active & (gid < g))  # the tail group only stores zeros
        def _accumulate():
            acc_ref[...] += jax.lax.dot_general(
                x_ref[...].astype(compute_dtype), w_ref[...].astype(compute_dtype), contract,
                preferred_element_type=jnp.float32,
            )

        @pl.when(active & (k_i == tiles_k - 1))
        def _store():
            rows = mtiles[i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mine = (rows >= offsets[gid]) & (rows < offsets[gid + 1])
            o_ref[...] = jnp.where(mine, acc_ref[...], o_ref[...].astype(jnp.float32)).astype(
                out_dtype
            )

    def x_map(n_i, i, k_i, gids, mtiles, offsets, nact):
        return mtiles[i], k_i

    def w_map(n_i, i, k_i, gids, mtiles, offsets, nact):
        g_i = jnp.minimum(gids[i], g - 1)
        return (g_i, n_i, k_i) if transpose_rhs else (g_i, k_i, n_i)

    def o_map(n_i, i, k_i, gids, mtiles, offsets, nact):
        return mtiles[i], n_i

    w_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(np_ // tn, meta.group_ids.shape[0], tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), x_map), pl.BlockSpec(w_block, w_map)],
            out_specs=pl.BlockSpec((tm, tn), o_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name="ragged_gmm",
    )(meta.group_ids, meta.m_tile_ids, meta.group_offsets, meta.num_active, x_mk, w)
    return out[:m, :n]


def tgmm(
    a_mk: jax.Array,
    b_mn: jax.Array,
    group_sizes: jax.Array,
    out_dtype: np.dtype,
    *,
    tiling: Tiling | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """out[g] = a_g^T @ b_g over the rows of group g -> [G,K,N]; empty groups give zeros."""
    m, k = a_mk.shape
    n = b_mn.shape[1]
    g = group_sizes.shape[0]
    tiling = _resolve(tiling, m, k, n, g, a_mk.dtype, b_mn.dtype, out_dtype)
    tm, tk, tn = _fit(tiling[0], m, 8), _fit(tiling[1], k, 128), _fit(tiling[2], n, 128)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    a_mk = pad_to(a_mk, (mp, kp))
    b_mn = pad_to(b_mn, (mp, np_))
    meta = tile_metadata(group_sizes, m=m, m_pad=mp, tm=tm, tail_group=False, visit_empty=True)
    num_steps = meta.group_ids.shape[0]
    compute_dtype = jnp.promote_types(a_mk.dtype, b_mn.dtype)

    def kernel(gids, mtiles, offsets, nact, a_ref, b_ref, o_ref, acc_ref):
        i = pl.program_id(2)
        gid = gids[i]

        @pl.when((i == 0) | (gids[jnp.maximum(i - 1, 0)] != gid))
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        start, end = offsets[gid], offsets[gid + 1]

        @pl.when((i < nact[0]) & (end > start))
        def _accumulate():
            rows = mtiles[i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            mine = (rows >= start) & (rows < end)
            # Mask both sides: rows of other groups (or padding) must not leak, even as NaN.
            a = jnp.where(mine, a_ref[...].astype(jnp.float32), 0.0).astype(compute_dtype)
            b = jnp.where(mine, b_ref[...].astype(jnp.float32), 0.0).astype(compute_dtype)
            acc_ref[...] += jnp.dot(a.T, b, preferred_element_type=jnp.float32)

        is_last = i == num_steps - 1
        @pl.when(is_last | (gids[jnp.minimum(i + 1, num_steps - 1)] != gid))
        def _store():
            o_ref[...] = acc_ref[...].astype(out_dtype)

    def a_map(n_i, k_i, i, gids, mtiles, offsets, nact):
        return mtiles[i], k_i

    def b_map(n_i, k_i, i, gids, mtiles, offsets, nact):
        return mtiles[i], n_i

    def o_map(n_i, k_i, i, gids, mtiles, offsets, nact):
        return gids[i], k_i, n_i

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(np_ // tn, kp // tk, num_steps),
            in_specs=[pl.BlockSpec((tm, tk), a_map), pl.BlockSpec((tm, tn), b_map)],
            out_specs=pl.BlockSpec((None, tk, tn), o_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name="ragged_tgmm",
    )(meta.group_ids, meta.m_tile_ids, meta.group_offsets, meta.num_active, a_mk, b_mn)
    return out[:, :k, :n]


def make_pallas_tpu(
    *, tiling: Tiling | None = None, interpret: bool | None = None
) -> RaggedMatmul:
    """A ``ragged_matmul`` implementation with the given tiles (None: ``default_tiling``
    for each call's shapes and the targeted generation).

    ``interpret=None`` interprets everywhere but on TPU (CPU tests use it).
    """
    opts = dict(tiling=tiling, interpret=interpret)
    return make_ragged_matmul(functools.partial(gmm, **opts), functools.partial(tgmm, **opts))


pallas_tpu_ragged_matmul = make_pallas_tpu()
