"""The single dispatch point for the grouped matmul: argument checks, then backend -> impl."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ragged.cpu import cpu_bucketed_ragged_matmul
from pallas_kernels.ragged.pallas_gpu import pallas_gpu_ragged_matmul
from pallas_kernels.ragged.pallas_tpu import pallas_tpu_ragged_matmul
from pallas_kernels.ragged.reference import reference_ragged_matmul

# name -> callable with reference_ragged_matmul's keyword signature; each has a custom VJP
# (vjp.py). The Pallas ones interpret off their own backend (slow: tiny tests only).
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": reference_ragged_matmul,
    "cpu_bucketed": cpu_bucketed_ragged_matmul,
    "pallas_tpu": pallas_tpu_ragged_matmul,
    "pallas_gpu": pallas_gpu_ragged_matmul,
}
# backend -> preferred implementation names, first available wins. GPU: ragged_dot is a dense
# expansion on CUDA with jaxlib 0.10.x (see pallas_gpu.py), so the Pallas kernel comes first.
_DEFAULTS: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "reference"),
    "gpu": ("pallas_gpu", "reference"),
    "cpu": ("cpu_bucketed", "reference"),
}


def _default_implementation() -> str:
    for name in _DEFAULTS.get(jax.default_backend(), ("reference",)):
        if name in IMPLEMENTATIONS:
            return name
    return "reference"


def ragged_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type: jnp.dtype | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """``jax.lax.ragged_dot`` semantics: rows of ``x`` [M, K] are sorted by group.

    Group g owns the next ``group_sizes[g]`` rows and multiplies them by ``w[g]`` ([K, N], or
    [N, K] with ``transpose_rhs``). Rows past ``sum(group_sizes)`` come back as zeros.
    Returns [M, N] in ``preferred_element_type`` (default: x's dtype). Differentiable in x and
    w (rows past the sum get zero gradient); ``sum(group_sizes)`` must not exceed M.
    """
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"ragged_matmul: want x [M,K], w [G,K,N], group_sizes [G]; got {x.shape}, {w.shape}, "
            f"{group_sizes.shape}"
        )
    k_w = w.shape[2] if transpose_rhs else w.shape[1]
    if x.shape[1] != k_w or w.shape[0] != group_sizes.shape[0]:
        raise ValueError(
            f"ragged_matmul: x {x.shape}, w {w.shape} (transpose_rhs={transpose_rhs}) and "
            f"group_sizes {group_sizes.shape} disagree"
        )
    name = implementation or _default_implementation()
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"ragged_matmul: unknown implementation {name!r}; have {sorted(IMPLEMENTATIONS)}"
        )
    return IMPLEMENTATIONS[name](
        x, w, group_sizes, transpose_rhs=transpose_rhs,
        preferred_element_type=preferred_element_type,
    )
