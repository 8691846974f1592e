"""One ``jax.custom_vjp`` shared by every grouped-matmul backend.

A backend supplies two kernels:

* ``gmm(x [M,K], w [G,K,N] | [G,N,K], group_sizes [G], transpose_rhs, out_dtype) -> [M,N]``,
  rows past ``sum(group_sizes)`` zero;
* ``tgmm(a [M,K], b [M,N], group_sizes [G], out_dtype) -> [G,K,N]`` with
  ``out[g] = a_g^T @ b_g`` over the rows of group g (rows past the sum ignored).

The backward is then ``dx = gmm(dy, w, transpose_rhs=not transpose_rhs)`` and
``dw = tgmm(x, dy)`` (or ``tgmm(dy, x)`` for a transposed rhs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Gmm(Protocol):
    def __call__(
        self, x: jax.Array, w: jax.Array, group_sizes: jax.Array, transpose_rhs: bool,
        out_dtype: np.dtype,
    ) -> jax.Array: ...


class Tgmm(Protocol):
    def __call__(
        self, a: jax.Array, b: jax.Array, group_sizes: jax.Array, out_dtype: np.dtype
    ) -> jax.Array: ...


RaggedMatmul = Callable[..., jax.Array]


def make_ragged_matmul(gmm: Gmm, tgmm: Tgmm) -> RaggedMatmul:
    """Builds an implementation with ``reference_ragged_matmul``'s keyword signature."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def op(x, w, group_sizes, transpose_rhs, out_dtype):
        return gmm(x, w, group_sizes, transpose_rhs, out_dtype)

    def op_fwd(x, w, group_sizes, transpose_rhs, out_dtype):
        return op(x, w, group_sizes, transpose_rhs, out_dtype), (x, w, group_sizes)

    def op_bwd(transpose_rhs, out_dtype, res, dy):
        x, w, group_sizes = res
        dx = gmm(dy, w, group_sizes, not transpose_rhs, x.dtype)
        if transpose_rhs:
            dw = tgmm(dy, x, group_sizes, w.dtype)
        else:
            dw = tgmm(x, dy, group_sizes, w.dtype)
        # group_sizes is integer: its cotangent is float0 zeros.
        dsizes = np.zeros(group_sizes.shape, dtype=jax.dtypes.float0)
        return dx, dw, dsizes

    op.defvjp(op_fwd, op_bwd)

    def ragged_matmul(
        x: jax.Array,
        w: jax.Array,
        group_sizes: jax.Array,
        *,
        transpose_rhs: bool,
        preferred_element_type: jnp.dtype | None,
    ) -> jax.Array:
        x, w = jnp.asarray(x), jnp.asarray(w)
        out_dtype = jnp.dtype(preferred_element_type or x.dtype)
        return op(x, w, group_sizes.astype(jnp.int32), bool(transpose_rhs), out_dtype)

    return ragged_matmul
