"""Causal (optionally sliding-window) attention with per-head sinks: one op, several backends."""

from pallas_kernels.attn.dispatch import IMPLEMENTATIONS, attention, use_implementation

__all__ = ["IMPLEMENTATIONS", "attention", "use_implementation"]
