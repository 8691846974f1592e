"""Which TPU generation a kernel is being built for, and what that generation allows.

Read at trace time: the device of an enclosing ``jax.default_device(...)`` block (how the
compile checks target compile-only devices from a CPU host), else the default backend's first
device. None when neither is a TPU (interpret mode, tests): callers then take settings that
fit every generation.
"""

from __future__ import annotations

import jax

MIB = 1 << 20

# Default scoped VMEM limit Mosaic kernels may use (XLA's --xla_tpu_scoped_vmem_limit_kib
# defaults); a kernel over it fails to compile unless it raises the limit.
SCOPED_VMEM_BYTES = {"v4": 16 * MIB, "v5e": 16 * MIB, "v5p": 16 * MIB, "v6e": 32 * MIB}

# device_kind prefixes, most specific first.
_KINDS = (("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v5 lite", "v5e"),
          ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"), ("TPU v4", "v4"))


def generation_of(device_kind: str) -> str | None:
    for prefix, name in _KINDS:
        if device_kind.startswith(prefix):
            return name
    return None


def tpu_generation() -> str | None:
    """"v4" | "v5e" | "v5p" | "v6e" for the TPU being targeted, or None."""
    dev = jax.config.jax_default_device
    if dev is None or getattr(dev, "platform", None) != "tpu":
        if jax.default_backend() != "tpu":
            return None
        dev = jax.devices()[0]
    return generation_of(dev.device_kind)


def scoped_vmem_bytes(generation: str | None) -> int:
    """The VMEM budget to size tiles for (the smallest of all when unknown)."""
    return SCOPED_VMEM_BYTES.get(generation, min(SCOPED_VMEM_BYTES.values()))
