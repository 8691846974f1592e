"""The single dispatch point for the grouped matmul: argument checks, then backend -> impl."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from pallas_kernels.ragged.cpu import cpu_bucketed_ragged_matmul
from pallas_kernels.ragged.pallas_gpu import make_pallas_gpu, pallas_gpu_ragged_matmul
from pallas_kernels.ragged.pallas_tpu import make_pallas_tpu, pallas_tpu_ragged_matmul
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


# Pallas implementations by name: factories taking ``interpret`` (None = off their backend).
_PALLAS: dict[str, Callable[..., Callable[..., jax.Array]]] = {
    "pallas_tpu": make_pallas_tpu,
    "pallas_gpu": make_pallas_gpu,
}
PALLAS = frozenset(_PALLAS)

# Set by `use_implementation`: (name, interpret) for calls that do not name their own.
_SELECTED: contextvars.ContextVar[tuple[str | None, bool | None]] = contextvars.ContextVar(
    "ragged_matmul", default=(None, None)
)


def _check_choice(name: str | None, interpret: bool | None) -> None:
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(
            f"ragged_matmul: unknown implementation {name!r}; have {sorted(IMPLEMENTATIONS)}"
        )
    if interpret and name is not None and name not in PALLAS:
        raise ValueError(
            f"ragged_matmul: interpret=True needs a Pallas implementation ({sorted(PALLAS)}), "
            f"not {name!r}"
        )


@contextlib.contextmanager
def use_implementation(
    name: str | None = None, *, interpret: bool | None = None
) -> Iterator[None]:
    """Route every `ragged_matmul` call traced in this block (the model's MoE too) to `name`,
    with `interpret` as in `ragged_matmul`."""
    _check_choice(name, interpret)
    token = _SELECTED.set((name, interpret))
    try:
        yield
    finally:
        _SELECTED.reset(token)


@functools.cache
def _pallas_impl(name: str, interpret: bool) -> Callable[..., jax.Array]:
    return _PALLAS[name](interpret=interpret)


def _default_implementation() -> str:
    selected, _ = _SELECTED.get()
    if selected is not None:
        return selected
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
    interpret: bool | None = None,
) -> jax.Array:
    """``jax.lax.ragged_dot`` semantics: rows of ``x`` [M, K] are sorted by group.

    Group g owns the next ``group_sizes[g]`` rows and multiplies them by ``w[g]`` ([K, N], or
    [N, K] with ``transpose_rhs``). Rows past ``sum(group_sizes)`` come back as zeros.
    Returns [M, N] in ``preferred_element_type`` (default: x's dtype). Differentiable in x and
    w (rows past the sum get zero gradient); ``sum(group_sizes)`` must not exceed M.

    ``implementation`` forces one of ``IMPLEMENTATIONS`` (default: the best for the backend).
    ``interpret`` is for the Pallas ones: False compiles the kernel even on a CPU host (to
    lower or AOT-compile it for a TPU/GPU target), True runs the Pallas interpreter, None
    (default) interprets only off the kernel's own backend.
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
    if interpret is None:
        interpret = _SELECTED.get()[1]
    _check_choice(name, interpret)
    impl = IMPLEMENTATIONS[name]
    if name in PALLAS and interpret is not None:
        impl = _pallas_impl(name, interpret)
    return impl(
        x, w, group_sizes, transpose_rhs=transpose_rhs,
        preferred_element_type=preferred_element_type,
    )
