"""Accelerator kernels for mimo-jax, each behind one dispatch point.

Each op picks an implementation from the default backend (TPU / GPU / CPU) unless the caller
passes ``implementation=`` (or a ``use_implementation`` block chooses one); model code calls
the op and never branches on the backend. ``interpret=False`` compiles a Pallas kernel even on
a CPU host, which is how the compile checks lower them for TPU and GPU targets.

Subpackages: ``pallas_kernels.attn`` (``attention``: reference, XLA banded, Pallas TPU / GPU),
``pallas_kernels.decode`` (``cached_attention`` over a KV cache) and ``pallas_kernels.ragged``
(``ragged_matmul``); ``pallas_kernels.compile_check`` lowers and
compiles kernels for accelerators from a CPU host.
"""

from pallas_kernels.attn import attention
from pallas_kernels.decode import cached_attention
from pallas_kernels.ragged import ragged_matmul

__all__ = ["attention", "cached_attention", "ragged_matmul"]
