"""Reference grouped matmul: XLA's ``ragged_dot`` (exact, but slow on XLA:CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_ragged_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool,
    preferred_element_type: jnp.dtype | None,
) -> jax.Array:
    if transpose_rhs:
        w = jnp.swapaxes(w, 1, 2)
    return jax.lax.ragged_dot(
        x, w, group_sizes.astype(jnp.int32), preferred_element_type=preferred_element_type
    )
