"""Models created directly in their shards: never a full copy on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import MiMo
from mimo_jax.model.shapes import abstract_model
from mimo_jax.sharding.rules import ShardingRules, state_shardings


def create_sharded(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules, *, seed: int = 0,
                   **model_kwargs) -> MiMo:
    """A randomly initialised model whose parameters are created already sharded."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, **model_kwargs))
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(MiMo(cfg, rngs=nnx.Rngs(seed), **model_kwargs))

    # XLA partitions the initialisers: each device only ever computes its own shards.
    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def placer(state: nnx.State, placement: tuple[jax.sharding.Mesh, ShardingRules] | None):
    """`place(path, host_array) -> jax.Array`: on the default device, or into its shards
    (checked against the mesh before anything is read)."""
    if placement is None:
        return lambda path, value: jnp.asarray(value)
    shardings = {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state, *placement))}
    return lambda path, value: jax.device_put(value, shardings[path])
