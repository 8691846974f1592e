"""Reference grouped matmul: XLA's ``ragged_dot`` (exact, but slow on XLA:CPU and, as of jaxlib
0.10, expanded to a dense dot over all groups on CUDA).

Wrapped in the shared custom VJP like every backend: dx is a ``ragged_dot`` with the weights
transposed, dw a ``ragged_dot_general`` that is ragged in the contracting (row) dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged.vjp import make_ragged_matmul


def gmm(
    x_mk: jax.Array, w: jax.Array, group_sizes: jax.Array, transpose_rhs: bool,
    out_dtype: np.dtype,
) -> jax.Array:
    if transpose_rhs:
        w = jnp.swapaxes(w, 1, 2)
    return jax.lax.ragged_dot(x_mk, w, group_sizes, preferred_element_type=out_dtype)


def tgmm(
    a_mk: jax.Array, b_mn: jax.Array, group_sizes: jax.Array, out_dtype: np.dtype
) -> jax.Array:
    # Ragged in the contracting dim: out[g] = a[rows of g]^T @ b[rows of g] -> [G, K, N].
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    return jax.lax.ragged_dot_general(
        a_mk, b_mn, group_sizes, dims, preferred_element_type=out_dtype
    )


reference_ragged_matmul = make_ragged_matmul(gmm, tgmm)
