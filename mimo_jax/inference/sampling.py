"""Sampling: greedy, temperature, top-k, top-p, as one probability distribution per row.

Everything is traced with the parameters as (dynamic) scalars, so changing them never
recompiles. Greedy (temperature 0) is the one-hot distribution on the argmax, which makes the
speculative rejection rule reduce exactly to "accept the draft iff it is the argmax".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    temperature: jax.Array  # [] float32; <= 0 means greedy
    top_k: jax.Array  # [] int32; <= 0 means off
    top_p: jax.Array  # [] float32; >= 1 means off


def sampling_params(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    return SamplingParams(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def probabilities(logits_bv: jax.Array, params: SamplingParams) -> jax.Array:
    """[..., V] float32 distribution the sampler draws from (one-hot argmax when greedy).
    Runtime branches skip the vocabulary sort when it is not needed."""
    logits = logits_bv.astype(jnp.float32)
    v = logits.shape[-1]

    def greedy(x):
        return jax.nn.one_hot(jnp.argmax(x, axis=-1), v, dtype=jnp.float32)

    def plain(x):
        return jax.nn.softmax(x / jnp.maximum(params.temperature, 1e-6), axis=-1)

    filtered = (params.top_k > 0) | (params.top_p < 1.0)
    branch = jnp.where(params.temperature > 0, jnp.where(filtered, 2, 1), 0)
    return jax.lax.switch(branch, [greedy, plain, lambda x: _filtered(x, params)], logits)


def _filtered(logits: jax.Array, params: SamplingParams) -> jax.Array:
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(params.temperature, 1e-6)
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    ranks = jnp.arange(v)
    # top-k: keep ranks < k; top-p: keep the smallest prefix whose mass reaches p.
    keep = jnp.where(params.top_k > 0, ranks < params.top_k, True)
    probs_sorted = jax.nn.softmax(jnp.where(keep, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep &= mass_before < params.top_p
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    return jax.nn.softmax(jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)


def sample(key: jax.Array, probs_bv: jax.Array) -> jax.Array:
    """One token per row [...] from a distribution (zeros are never drawn)."""
    return jax.random.categorical(key, jnp.log(probs_bv), axis=-1).astype(jnp.int32)
