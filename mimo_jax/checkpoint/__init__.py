"""Checkpoint conversion: released safetensors (FP8 included, MTP heads) <-> Orbax, streaming.

See `orbax_io` for the on-disk layouts, `convert` for the converters, `fp8` for the block
(de)quantisation rules.
"""

from mimo_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from mimo_jax.checkpoint.orbax_io import restore_params

__all__ = ["hf_to_orbax", "orbax_to_hf", "restore_params"]
