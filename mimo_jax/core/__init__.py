"""The bottom layer: dtype names, user-facing errors and log output, shared by every layer."""

from mimo_jax.core.dtypes import canonical_dtype, jnp_dtype
from mimo_jax.core.errors import CheckpointError

__all__ = ["CheckpointError", "canonical_dtype", "jnp_dtype"]
