"""Auxiliary-loss-free load balancing: the router correction-bias update (paper §1.4).

After every optimizer step, outside the optimizer, each MoE layer's bias moves by
`gamma * sign(mean_load - load)`: under-loaded experts become more likely to be chosen.
The model reports `router.expert_load` [L_moe, E] in layer order; this maps each row onto the
`RouterBias` variable of that layer (unscanned prefix layers, or a row of a scanned block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import scan_plan


def bias_rows(cfg: ModelConfig) -> dict[tuple, int | np.ndarray]:
    """{state path of a RouterBias: router row (an int, or [n_blocks] rows for a scanned one)}."""
    moe_rank = np.cumsum([t == "moe" for t in cfg.mlp_types]) - 1  # row of each MoE layer
    plan = scan_plan(cfg)
    rows: dict[tuple, int | np.ndarray] = {}
    for i in range(plan.num_prefix):
        if cfg.mlp_types[i] == "moe":
            rows[("prefix_layers", i, "mlp", "correction_bias")] = int(moe_rank[i])
    for j in range(plan.period):
        layers = plan.num_prefix + j + plan.period * np.arange(plan.num_blocks)
        if cfg.mlp_types[plan.num_prefix + j] == "moe":
            rows[("blocks", "layers", j, "mlp", "correction_bias")] = moe_rank[layers]
    return rows


def bias_delta(load_le: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """gamma * sign(mean_load - load) per layer: [L, E]."""
    mean_l1 = jnp.mean(load_le, axis=-1, keepdims=True)
    return gamma * jnp.sign(mean_l1 - load_le)


def update_bias(
    state: nnx.State, load_le: jax.Array, gamma: float | jax.Array, cfg: ModelConfig
) -> nnx.State:
    """A new state with every RouterBias moved by `bias_delta`; other variables unchanged."""
    if not cfg.router_correction_bias or "moe" not in cfg.mlp_types:
        return state
    delta_le = bias_delta(load_le, gamma)
    rows = bias_rows(cfg)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path in rows:
            r = rows[path]
            value = var.get_value()
            new = value + delta_le[r].astype(value.dtype)
            var = var.replace(new)
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def load_imbalance(load_le: jax.Array) -> jax.Array:
    """Per-layer max load / mean load (1.0 = perfectly balanced): [L]."""
    return jnp.max(load_le, axis=-1) / jnp.maximum(jnp.mean(load_le, axis=-1), 1e-9)
