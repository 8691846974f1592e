"""Token -> expert dispatch around the grouped matmul (dropless by default).

    out = expert_ffn(x_td, expert_ids_tk, expert_weights_tk, gate_up_edfc, down_efd,
                     group_offset=0, num_experts=None, capacity_factor=None,
                     implementation=None)
    out.y_td         [T, D] in x's dtype: sum_k weight[t,k] * Expert_{id[t,k]}(x[t])
    out.num_dropped  [] int32: assignments to the experts held here that the capacity dropped
                     (always 0 when dropless); sum it over expert-parallel shards for a total.

Route (done by the caller) -> sort assignments by local expert -> one grouped matmul for the
fused gate/up projection -> SwiGLU -> grouped down projection -> gather back and weighted
combine in float32.

Expert parallelism: this device holds experts [group_offset, group_offset + E_local);
assignments to other experts contribute zero, so summing ``y_td`` over shards gives the full
layer. Capacity: with ``capacity_factor`` each local expert keeps at most
``ceil(capacity_factor * T * K / num_experts)`` assignments, earliest tokens first (stable sort),
and the grouped matmuls run on ``min(T*K, E_local * capacity)`` rows (bounded compute).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels
from mimo_jax.model.layers import swiglu


class ExpertFFNOutput(NamedTuple):
    y_td: jax.Array  # [T, D], x's dtype
    num_dropped: jax.Array  # [] int32, local assignments dropped by the capacity


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Assignments one expert may keep: ceil(capacity_factor * T * K / E_total)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def expert_ffn(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    expert_weights_tk: jax.Array,
    gate_up_edfc: jax.Array,
    down_efd: jax.Array,
    *,
    group_offset: int | jax.Array = 0,
    num_experts: int | None = None,
    capacity_factor: float | None = None,
    implementation: str | None = None,
) -> ExpertFFNOutput:
    """SwiGLU experts ``gate_up_edfc`` [E_local, D, F, 2] (gate at c=0, up at c=1) and
    ``down_efd`` [E_local, F, D] applied to each token's top-k assignments.

    ``expert_ids_tk`` [T, K] are global expert ids, ``expert_weights_tk`` [T, K] their combine
    weights. ``num_experts`` (total over all shards, default E_local) only sets the capacity.
    ``implementation`` is passed to ``pallas_kernels.ragged_matmul``.
    """
    t, d = x_td.shape
    k = expert_ids_tk.shape[1]
    e_local, _, f, _ = gate_up_edfc.shape
    m = t * k

    local_m = expert_ids_tk.reshape(-1).astype(jnp.int32) - group_offset
    is_local_m = (local_m >= 0) & (local_m < e_local)
    key_m = jnp.where(is_local_m, local_m, e_local)  # foreign assignments sort last
    order_r = jnp.argsort(key_m, stable=True)  # sorted position -> assignment
    sizes_e = jnp.bincount(key_m, length=e_local + 1)[:e_local].astype(jnp.int32)

    if capacity_factor is None:
        rows, kept_e = m, sizes_e
        slot_r = jnp.where(key_m[order_r] < e_local, jnp.arange(m, dtype=jnp.int32), m)
    else:
        cap = expert_capacity(capacity_factor, t, k, num_experts or e_local)
        rows = min(m, e_local * cap)
        kept_e = jnp.minimum(sizes_e, cap)
        key_r = key_m[order_r]
        starts_e = jnp.cumsum(sizes_e) - sizes_e
        kept_starts_e = jnp.cumsum(kept_e) - kept_e
        key_c = jnp.minimum(key_r, e_local - 1)  # foreign rows are masked below
        rank_r = jnp.arange(m, dtype=jnp.int32) - starts_e[key_c]
        keep_r = (key_r < e_local) & (rank_r < cap)
        slot_r = jnp.where(keep_r, kept_starts_e[key_c] + rank_r, rows)
    num_dropped = jnp.sum(sizes_e) - jnp.sum(kept_e)

    # slot -> assignment (slots past sum(kept_e) stay 0: ragged_matmul returns zero rows there)
    # and assignment -> slot (``rows`` = dropped or foreign).
    assign_s = jnp.zeros(rows, jnp.int32).at[slot_r].set(order_r.astype(jnp.int32), mode="drop")
    slot_m = jnp.full(m, rows, jnp.int32).at[order_r].set(slot_r)

    x_sd = x_td[assign_s // k]
    h_sfc = pallas_kernels.ragged_matmul(
        x_sd, gate_up_edfc.reshape(e_local, d, 2 * f), kept_e, implementation=implementation
    ).reshape(rows, f, 2)
    h_sf = swiglu(h_sfc[..., 0], h_sfc[..., 1])
    y_sd = pallas_kernels.ragged_matmul(h_sf, down_efd, kept_e, implementation=implementation)

    valid_m = slot_m < rows
    y_md = jnp.where(valid_m[:, None], y_sd[jnp.minimum(slot_m, rows - 1)], 0)
    w_m = expert_weights_tk.reshape(-1).astype(jnp.float32)
    y_tkd = (y_md.astype(jnp.float32) * w_m[:, None]).reshape(t, k, d)
    y_td = jnp.sum(y_tkd, axis=1).astype(x_td.dtype)
    return ExpertFFNOutput(y_td, num_dropped.astype(jnp.int32))
