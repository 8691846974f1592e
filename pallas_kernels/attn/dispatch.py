"""The single dispatch point for attention: argument checks, then backend -> implementation."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from pallas_kernels.attn.pallas_gpu import pallas_gpu_attention
from pallas_kernels.attn.pallas_tpu import pallas_tpu_attention
from pallas_kernels.attn.reference import reference_attention
from pallas_kernels.attn.xla_banded import xla_attention

# name -> callable with reference_attention's keyword signature.
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": reference_attention,
    "xla": xla_attention,
    "pallas_tpu": pallas_tpu_attention,
    "pallas_gpu": pallas_gpu_attention,
}
# backend -> preferred implementation names, first available wins.
_DEFAULTS: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "xla"),
    "cpu": ("xla",),
}


# Implementations that are Pallas kernels: the only ones with an interpreter mode.
PALLAS = frozenset({"pallas_tpu", "pallas_gpu"})

# Set by `use_implementation`: (name, interpret) for calls that do not name their own.
_SELECTED: contextvars.ContextVar[tuple[str | None, bool | None]] = contextvars.ContextVar(
    "attention", default=(None, None)
)


def _check_choice(name: str | None, interpret: bool | None) -> None:
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention: unknown implementation {name!r}; have {sorted(IMPLEMENTATIONS)}"
        )
    if interpret and name is not None and name not in PALLAS:
        raise ValueError(
            f"attention: interpret=True needs a Pallas implementation ({sorted(PALLAS)}), "
            f"not {name!r}"
        )


@contextlib.contextmanager
def use_implementation(
    name: str | None = None, *, interpret: bool | None = None
) -> Iterator[None]:
    """Route every `attention` call traced in this block (the model's too) to `name`.

    ``interpret=False`` compiles the Pallas kernel even where the default backend is the CPU
    (to lower or AOT-compile for an accelerator from a CPU host); None keeps each kernel's
    default (interpret off its own backend).
    """
    _check_choice(name, interpret)
    token = _SELECTED.set((name, interpret))
    try:
        yield
    finally:
        _SELECTED.reset(token)


def _default_implementation() -> str:
    selected, _ = _SELECTED.get()
    if selected is not None:
        return selected
    for name in _DEFAULTS.get(jax.default_backend(), ("xla",)):
        if name in IMPLEMENTATIONS:
            return name
    return "reference"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None = None,
    window: int | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    q_offset: int | jax.Array = 0,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal multi-head attention with GQA, an optional sliding window and per-head sinks.

    Args:
      q: [B, T, Hq, Dqk] queries at absolute positions ``q_offset + arange(T)``.
      k: [B, S, Hkv, Dqk] keys at positions ``arange(S)``; Hq must be a multiple of Hkv
        (query head h reads KV head ``h // (Hq // Hkv)``).
      v: [B, S, Hkv, Dv]; Dv may differ from Dqk.
      sinks: optional [Hq] logits that join each softmax denominator only.
      window: keys visible to a query, itself included (None = full causal attention).
      segment_ids: [B, S] document ids of the keys (queries take ``[:, q_offset:q_offset+T]``),
        or a pair ``(q_segment_ids [B, T], kv_segment_ids [B, S])``. Tokens attend only within
        their document; id 0 marks padding, whose rows come back as zeros.
      q_offset: scalar or [B] int: where the queries start (decode, chunked prefill).
      scale: score scale, default ``Dqk ** -0.5``.
      implementation: force one of ``IMPLEMENTATIONS`` (default: the best for the backend).
      interpret: for the Pallas implementations: False compiles the kernel even on a CPU
        host (to lower or AOT-compile it for a TPU/GPU target), True runs the Pallas
        interpreter; None (default) interprets only off the kernel's own backend.

    Returns:
      [B, T, Hq, Dv] in q's dtype.
    """
    b, t, hq, dqk = q.shape
    if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != b:
        raise ValueError(
            f"attention: k {k.shape} and v {v.shape} must be [B, S, Hkv, D] with B={b}"
        )
    if k.shape[-1] != dqk:
        raise ValueError(f"attention: q head dim {dqk} != k head dim {k.shape[-1]}")
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"attention: sinks must have shape ({hq},), got {sinks.shape}")
    s = k.shape[1]
    static_q_offset = q_offset if isinstance(q_offset, int) else None
    q_offset = jnp.asarray(q_offset, jnp.int32)
    if segment_ids is None:
        q_seg = kv_seg = None
    elif isinstance(segment_ids, tuple):
        q_seg, kv_seg = segment_ids
    else:
        kv_seg = segment_ids
        if q_offset.ndim == 0:
            q_seg = jax.lax.dynamic_slice_in_dim(kv_seg, q_offset, t, axis=1)
        else:
            q_seg = jax.vmap(lambda row, o: jax.lax.dynamic_slice_in_dim(row, o, t))(
                kv_seg, q_offset
            )
    if kv_seg is not None and (kv_seg.shape != (b, s) or q_seg.shape != (b, t)):
        raise ValueError(
            f"attention: segment ids {q_seg.shape}/{kv_seg.shape} do not match B={b}, T={t}, S={s}"
        )
    name = implementation or _default_implementation()
    if interpret is None:
        interpret = _SELECTED.get()[1]
    _check_choice(name, interpret)
    extra = {"interpret": interpret} if name in PALLAS else {}
    if name in ("pallas_tpu", "xla"):  # a static offset lets them skip never-used blocks
        extra["static_q_offset"] = static_q_offset
    return IMPLEMENTATIONS[name](
        q, k, v, sinks=sinks, window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        q_offset=q_offset, scale=dqk**-0.5 if scale is None else scale, **extra,
    )
