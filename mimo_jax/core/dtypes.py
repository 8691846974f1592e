"""One spelling for floating-point dtypes.

Users pass dtypes as strings ("bf16", "bfloat16", "torch.float32", "f32"), numpy or jax dtype
objects, or scalar types (`jnp.bfloat16`, `np.float32`). Configs store the canonical numpy
name ("bfloat16", "float32", "float16") so they stay hashable, printable and JSON-friendly.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

DTypeLike = str | np.dtype | type | Any
CANONICAL: tuple[str, ...] = ("float32", "bfloat16", "float16")
_ALIASES = {
    "f32": "float32", "fp32": "float32", "float": "float32", "single": "float32",
    "bf16": "bfloat16",
    "f16": "float16", "fp16": "float16", "half": "float16",
}


def canonical_dtype(dtype: DTypeLike, *, what: str = "dtype",
                    allowed: tuple[str, ...] = CANONICAL) -> str:
    """The canonical name of a floating dtype given in any common spelling.

    >>> canonical_dtype("bf16"), canonical_dtype(jnp.float32), canonical_dtype(np.float16)
    ('bfloat16', 'float32', 'float16')
    """
    name: str | None = None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.").removeprefix("jnp.")
        key = key.removeprefix("np.").removeprefix("numpy.")
        name = _ALIASES.get(key, key)
    else:
        try:
            name = np.dtype(dtype).name  # np/jnp scalar types, np.dtype, ml_dtypes
        except TypeError:
            name = None
        if name is None or name == "object":
            name = str(getattr(dtype, "dtype", None) or "")
            name = name if name in allowed else None
    if name not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)} (or an alias such as "
                         f"'bf16', 'f32', jnp.bfloat16), got {dtype!r}")
    return name


def jnp_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The jnp dtype for any accepted spelling."""
    return jnp.dtype(canonical_dtype(dtype))
