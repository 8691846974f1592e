"""Checkpoints: safetensors reading, the released names, FP8 blocks, Orbax I/O, conversion,
inspect and loading.

See `orbax_io` for the on-disk layouts, `convert` for the converters, `fp8` for the block
(de)quantisation rules, `loading` for `load()`.
"""

from mimo_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from mimo_jax.checkpoint.loading import load
from mimo_jax.checkpoint.orbax_io import restore_params

__all__ = ["hf_to_orbax", "load", "orbax_to_hf", "restore_params"]
