"""Sharding as data: the logical-axis rule table, meshes and activation constraints.

Below the model: model code annotates parameters and activations with logical names and
never needs a mesh. Creating a model in its shards and memory plans live in
`mimo_jax.parallel`, which knows the model.
"""

from mimo_jax.sharding.mesh import make_mesh, mesh_shape
from mimo_jax.sharding.rules import (
    MESH_AXES,
    ShardingError,
    ShardingRules,
    activate,
    activation_sharding,
    active,
    axes_of,
    axis_size,
    constrain,
    replicated_fraction,
    state_shardings,
)

__all__ = [
    "MESH_AXES",
    "ShardingError",
    "ShardingRules",
    "activate",
    "activation_sharding",
    "active",
    "axes_of",
    "axis_size",
    "constrain",
    "make_mesh",
    "mesh_shape",
    "replicated_fraction",
    "state_shardings",
]
