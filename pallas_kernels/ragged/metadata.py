"""Group metadata for tiled grouped matmuls: which (group, row tile) each grid step visits.

Rows are sorted by group, so a row tile of ``tm`` rows can straddle several groups. Each group
visits every tile it touches (tiles at a boundary are visited once per group, consecutively,
each visit storing only its own rows); the visit list is padded to a static worst case.
Padding visits repeat the last real visit and are skipped by the kernels (``i >= num_active``),
so the tile index never changes across them (no extra DMA on TPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pads ``a`` at the end of each dim up to ``shape`` (no-op when equal)."""
    if a.shape == shape:
        return a
    return jnp.pad(a, [(0, s - d) for d, s in zip(a.shape, shape, strict=True)])


class TileMetadata(NamedTuple):
    group_offsets: jax.Array  # [G'+1] int32: group g owns rows [offsets[g], offsets[g+1])
    group_ids: jax.Array  # [L] int32: group of grid step i
    m_tile_ids: jax.Array  # [L] int32: row tile of grid step i (non-decreasing)
    num_active: jax.Array  # [1] int32: steps past this are padding


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(starts, ends) of each group's rows, clipped to ``m``."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    return starts, ends


def tile_metadata(
    group_sizes: jax.Array, *, m: int, m_pad: int, tm: int, tail_group: bool, visit_empty: bool
) -> TileMetadata:
    """Visits for ``m_pad // tm`` row tiles.

    ``tail_group`` adds a group G for rows [sum(group_sizes), m_pad) so that every row is owned
    and stored exactly once (gmm writes zeros there). ``visit_empty`` gives empty groups one
    visit (tgmm must still zero their output).
    """
    assert m_pad % tm == 0 and m_pad >= tm
    tiles_m = m_pad // tm
    starts, ends = group_bounds(group_sizes, m)
    if tail_group:
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m_pad, jnp.int32)])
    num_groups = starts.shape[0]
    nonempty = ends > starts
    first = starts // tm
    last = jnp.maximum(ends - 1, 0) // tm
    visits = jnp.where(nonempty, last - first + 1, 1 if visit_empty else 0).astype(jnp.int32)
    visit_ends = jnp.cumsum(visits)
    num_active = visit_ends[-1]
    # Tiles touched by non-empty groups overlap by at most one per group boundary, and each
    # empty group adds at most one visit: at most tiles_m + num_groups - 1 visits.
    length = tiles_m + num_groups - 1
    step = jnp.minimum(jnp.arange(length, dtype=jnp.int32), num_active - 1)
    group_ids = jnp.searchsorted(visit_ends, step, side="right").astype(jnp.int32)
    m_tile_ids = first[group_ids] + step - (visit_ends - visits)[group_ids]
    m_tile_ids = jnp.clip(m_tile_ids, 0, tiles_m - 1)  # an empty group at the very end
    offsets = jnp.concatenate([starts, ends[-1:]])
    return TileMetadata(offsets, group_ids, m_tile_ids.astype(jnp.int32), num_active[None])
