"""The single dispatch point for cached (decode / chunked-prefill) attention."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from pallas_kernels.decode import pallas_gpu, pallas_tpu
from pallas_kernels.decode import xla as decode_xla
from pallas_kernels.decode.pallas_tpu import pallas_tpu_cached_attention
from pallas_kernels.decode.reference import reference_cached_attention
from pallas_kernels.decode.xla import xla_cached_attention

IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": reference_cached_attention,
    "xla": xla_cached_attention,
    "pallas_tpu": pallas_tpu_cached_attention,
    "pallas_gpu": pallas_gpu.pallas_gpu_cached_attention,
}
_DEFAULTS: dict[str, tuple[str, ...]] = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "xla"),
    "cpu": ("xla",),
}
_SELECTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("decode", default=None)


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Route every `cached_attention` call traced in this block to `name`."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"cached_attention: unknown implementation {name!r}; have "
                         f"{sorted(IMPLEMENTATIONS)}")
    token = _SELECTED.set(name)
    try:
        yield
    finally:
        _SELECTED.reset(token)


def _default_implementation(dqk: int, dv: int) -> str:
    if _SELECTED.get() is not None:
        return _SELECTED.get()
    for name in _DEFAULTS.get(jax.default_backend(), ("xla",)):
        if name == "pallas_gpu" and not pallas_gpu.supported(dqk, dv):
            continue
        return name
    return "xla"


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cache_positions: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    new_positions: jax.Array,
    *,
    q_offset: int | jax.Array,
    cache_length: int | jax.Array | None = None,
    sinks: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Queries of a chunk over a KV cache plus the chunk's own keys (decode, speculative
    verification, chunked prefill); causal by explicit positions, GQA, optional sliding
    window and per-head sinks.

    Args:
      q: [B, T, Hq, Dqk] queries at positions ``q_offset[b] + arange(T)``.
      k_cache: [B, Hkv, S, Dqk] cached keys, heads-major; slot order is free (a ring buffer).
      v_cache: [B, Hkv, S, Dv].
      cache_positions: [B, S] int position of the key in each slot, -1 = empty.
      k_new: [B, N, Hkv, Dqk] the chunk's keys (not yet in the cache), v_new [B, N, Hkv, Dv].
      new_positions: [B, N] their positions, -1 = not a key (padding, inactive rows).
      q_offset: scalar or [B] int: where each row's queries start.
      cache_length: scalar or [B] int: only slots below it may hold a key (kernels skip the
        rest; a global cache filled to its length); default S.
      sinks: optional [Hq] logits that join each softmax denominator only.
      window: keys visible to a query, itself included (None = all earlier keys).
      scale: score scale, default ``Dqk ** -0.5``.
      implementation: one of ``IMPLEMENTATIONS`` (default: the best for the backend).

    Returns:
      [B, T, Hq, Dv] in q's dtype; a query that sees no key and has no sink gets zeros.
    """
    b, t, hq, dqk = q.shape
    if k_cache.ndim != 4 or v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[0] != b:
        raise ValueError(f"cached_attention: k_cache {k_cache.shape} and v_cache "
                         f"{v_cache.shape} must be [B, Hkv, S, D] with B={b}")
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[-1] != dqk or k_new.shape[-1] != dqk:
        raise ValueError(f"cached_attention: q head dim {dqk} != key head dims "
                         f"{k_cache.shape[-1]}/{k_new.shape[-1]}")
    if hq % hkv:
        raise ValueError(f"cached_attention: {hq} query heads are not a multiple of {hkv} "
                         "KV heads")
    n = k_new.shape[1]
    if (k_new.shape[0], k_new.shape[2]) != (b, hkv) or v_new.shape[:3] != k_new.shape[:3] or (
            v_new.shape[-1] != v_cache.shape[-1]):
        raise ValueError(f"cached_attention: k_new {k_new.shape} / v_new {v_new.shape} must be "
                         f"[B={b}, N, Hkv={hkv}, D] matching the cache")
    if cache_positions.shape != (b, s) or new_positions.shape != (b, n):
        raise ValueError(f"cached_attention: positions {cache_positions.shape} / "
                         f"{new_positions.shape} must be [B, S]=({b}, {s}) / [B, N]=({b}, {n})")
    if window is not None and window < 1:
        raise ValueError(f"cached_attention: window must be >= 1 or None, got {window}")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"cached_attention: sinks must have shape ({hq},), got {sinks.shape}")
    name = implementation or _default_implementation(dqk, v_cache.shape[-1])
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"cached_attention: unknown implementation {name!r}; have "
                         f"{sorted(IMPLEMENTATIONS)}")
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    length = s if cache_length is None else cache_length
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (b,))
    return IMPLEMENTATIONS[name](
        q, k_cache, v_cache, cache_positions.astype(jnp.int32), k_new, v_new,
        new_positions.astype(jnp.int32), q_offset=q_offset, cache_length=length,
        sinks=None if sinks is None else sinks.astype(jnp.float32), window=window,
        scale=dqk**-0.5 if scale is None else scale,
    )


def cache_partials(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cache_positions: jax.Array,
    *,
    q_offset: jax.Array,
    cache_length: jax.Array,
    window: int | None,
    scale: float,
) -> list[tuple[jax.Array, jax.Array]]:
    """The queries over the cache alone, as partial softmaxes [(o [B, T, Hq, Dv] float32
    normalised over their keys, lse [B, T, Hq])] to merge with other key sets (flash
    decoding across devices: `mimo_jax.model.context_parallel`), by the implementation
    `cached_attention` would pick (the reference one has no partials: XLA's stands in).
    `q_offset` and `cache_length` are [B] int."""
    name = _default_implementation(q.shape[-1], v_cache.shape[-1])
    kw = dict(window=window, scale=scale)
    if name == "pallas_tpu":
        kw.update(block_sizes=pallas_tpu.BlockSizes(),
                  interpret=jax.default_backend() == "cpu")
        return pallas_tpu.cache_part(q, k_cache, v_cache, cache_positions, q_offset,
                                     cache_length, **kw)
    if name == "pallas_gpu":
        kw.update(block_sizes=pallas_gpu.BlockSizes(),
                  interpret=jax.default_backend() == "cpu")
        return pallas_gpu.cache_part(q, k_cache, v_cache, cache_positions, q_offset,
                                     cache_length, **kw)
    return decode_xla.cache_part(q, k_cache, v_cache, cache_positions, q_offset, cache_length,
                                 **kw)
