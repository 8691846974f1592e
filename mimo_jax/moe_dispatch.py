"""Dropless token -> expert dispatch around the grouped matmul.

route (done by the caller) -> sort assignments by expert -> one grouped matmul for the fused
gate/up projection -> SwiGLU -> grouped down projection -> unsort and weighted combine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels


def expert_ffn(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    expert_weights_tk: jax.Array,
    gate_up_edfc: jax.Array,
    down_efd: jax.Array,
    *,
    group_offset: int = 0,
) -> jax.Array:
    """sum_k weight[t,k] * Expert_{id[t,k]}(x[t]) over the experts held here.

    ``gate_up_edfc`` is [E_local, D, F, 2] (gate at c=0, up at c=1) and ``down_efd`` [E_local, F, D]
    hold experts ``group_offset .. group_offset + E_local - 1``; assignments to other experts
    contribute zero (expert parallelism sums the per-device results).
    """
    t, d = x_td.shape
    k = expert_ids_tk.shape[1]
    e_local, _, f, _ = gate_up_edfc.shape
    local_ids = expert_ids_tk.reshape(-1) - group_offset
    is_local = (local_ids >= 0) & (local_ids < e_local)
    sort_key = jnp.where(is_local, local_ids, e_local)  # foreign assignments sort last
    order = jnp.argsort(sort_key, stable=True)
    group_sizes = jnp.bincount(sort_key, length=e_local + 1)[:e_local].astype(jnp.int32)

    x_sorted_md = x_td[order // k]
    h_mfc = pallas_kernels.ragged_matmul(
        x_sorted_md, gate_up_edfc.reshape(e_local, d, 2 * f), group_sizes
    ).reshape(-1, f, 2)
    h_mf = jax.nn.silu(h_mfc[..., 0]) * h_mfc[..., 1]
    y_sorted_md = pallas_kernels.ragged_matmul(h_mf, down_efd, group_sizes)

    y_md = jnp.zeros_like(y_sorted_md).at[order].set(y_sorted_md)
    w_m = jnp.where(is_local, expert_weights_tk.reshape(-1), 0.0)
    y_tkd = (y_md.astype(jnp.float32) * w_m[:, None]).reshape(t, k, d)
    return jnp.sum(y_tkd, axis=1).astype(x_td.dtype)
