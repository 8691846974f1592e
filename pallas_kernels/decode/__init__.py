"""Cached attention (decode, speculative verification, chunked prefill) behind one dispatch
point: ``cached_attention`` with reference, XLA, Pallas TPU and Pallas GPU implementations.

The keys are a KV cache (heads-major, explicit slot positions, so ring buffers fit) plus the
chunk's own new keys; each row has its own query offset.
"""

from pallas_kernels.decode.dispatch import IMPLEMENTATIONS, cached_attention, use_implementation

__all__ = ["IMPLEMENTATIONS", "cached_attention", "use_implementation"]
