"""Accelerator kernels for mimo-jax, each behind one dispatch point.

Each op picks an implementation from the default backend (TPU / GPU / CPU) unless the caller
passes ``implementation=``; model code calls the op and never branches on the backend.
"""

from pallas_kernels.attention import attention
from pallas_kernels.ragged import ragged_matmul

__all__ = ["attention", "ragged_matmul"]
