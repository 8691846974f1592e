"""Grouped (ragged) matmul for mixture-of-experts layers: one op, several backends."""

from pallas_kernels.ragged.dispatch import IMPLEMENTATIONS, ragged_matmul, use_implementation

__all__ = ["IMPLEMENTATIONS", "ragged_matmul", "use_implementation"]
