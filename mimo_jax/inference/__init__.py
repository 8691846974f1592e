"""Inference: KV caches by layer type, cached forward, sampling, MTP speculative decoding."""

from mimo_jax.inference.cast import with_dtype
from mimo_jax.inference.generate import GenerateOutput, generate, trace_counts
from mimo_jax.inference.kv_cache import KVCache, cache_bytes, init_cache, tree_bytes
from mimo_jax.inference.sampling import SamplingParams, probabilities, sampling_params

__all__ = [
    "GenerateOutput",
    "KVCache",
    "SamplingParams",
    "cache_bytes",
    "generate",
    "init_cache",
    "probabilities",
    "sampling_params",
    "trace_counts",
    "tree_bytes",
    "with_dtype",
]
