"""Lower and compile kernels for accelerators from a CPU host (no TPU or GPU needed).

- TPU: ``tpu_devices(topology)`` gives compile-only devices from libtpu
  (``jax.experimental.topologies``); ``compile_for_tpu`` AOT-compiles a function for one of
  them, which runs the real Mosaic compiler (it rejects VMEM overflows and layouts it cannot
  handle) and XLA:TPU, and returns the compiled executable with its memory analysis.
  Needs the ``libtpu`` wheel that ``jax[tpu]`` pins (in the ``test`` extra).
- GPU: ``lower_for_gpu`` lowers a function for CUDA; every Pallas kernel in it is lowered by
  Pallas' Triton path to a Triton MLIR module, which is run through the MLIR verifier here.
  jaxlib on a CPU host cannot go further (no ptxas / Triton backend), so type errors in the
  Triton IR are caught, while register or shared-memory overflows are not.

Kernels must be called with ``interpret=False`` (or inside ``use_implementation(...,
interpret=False)``): interpret mode is the default off their own backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

TPU_TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


class CompileCheckError(RuntimeError):
    """A kernel failed to lower, verify or compile for an accelerator target."""


# ----------------------------------------------------------------------------- TPU


@functools.cache
def tpu_devices(topology: str = "v5e:2x2") -> tuple[jax.Device, ...]:
    """Compile-only TPU devices of ``topology`` ("v5e:2x2", "v5p:2x2x1", "v6e:2x2", ...) or a
    generation name from ``TPU_TOPOLOGIES``. Raises ``CompileCheckError`` without libtpu."""
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) unless told that several
    # processes may load it: compile-only use needs no exclusive chip (pytest -n, CI jobs).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = TPU_TOPOLOGIES.get(topology, topology)
    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # no libtpu: RuntimeError / JaxRuntimeError, message varies
        raise CompileCheckError(
            f"no compile-only TPU topology {name!r} ({type(e).__name__}: {e}); install the "
            "libtpu wheel that jax[tpu] pins: pip install -e '.[test]' -c constraints.txt"
        ) from e


def tpu_available() -> bool:
    """Whether compile-only TPU devices can be made here (libtpu installed)."""
    try:
        tpu_devices("v5e")
    except CompileCheckError:
        return False
    return True


def _with_sharding(x: Any, sharding: jax.sharding.Sharding) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


def compile_for_tpu(
    fn: Callable[..., Any], *args: Any, topology: str = "v5e", **jit_kwargs: Any
) -> jax.stages.Compiled:
    """AOT-compiles ``fn(*args)`` for the first device of a compile-only TPU topology.

    ``args`` are ``jax.ShapeDtypeStruct`` pytrees (nothing is allocated); those without a
    sharding are placed on that device. Mosaic runs for every Pallas TPU kernel inside.
    """
    dev = tpu_devices(topology)[0]
    single = jax.sharding.SingleDeviceSharding(dev)
    args = jax.tree.map(functools.partial(_with_sharding, sharding=single), args)
    # Kernels that ask for the device kind while lowering read the default device.
    with jax.default_device(dev):
        try:
            return jax.jit(fn, **jit_kwargs).trace(*args).lower().compile()
        except Exception as e:
            raise CompileCheckError(f"TPU ({topology}) compile failed: {e}") from e


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Bytes from XLA's compiled memory analysis (per device)."""

    argument: int
    output: int
    temp: int
    alias: int
    code: int

    @property
    def peak_estimate(self) -> int:
        """Arguments + outputs + scratch, the buffers live at once at worst (aliases once)."""
        return self.argument + self.output + self.temp - self.alias

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> MemoryUse:
        m = compiled.memory_analysis()
        if m is None:
            raise CompileCheckError("the compiled executable has no memory analysis")
        return cls(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                   temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes,
                   code=m.generated_code_size_in_bytes)


# ----------------------------------------------------------------------------- GPU (Triton)


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas kernel lowered to a Triton MLIR module, and what the verifier said."""

    name: str
    ok: bool
    error: str | None
    asm: str


def _triton_lowering_module():
    try:
        from jax._src.pallas.triton import lowering
    except ImportError as e:  # jaxlib without the Triton dialect
        raise CompileCheckError(f"this jaxlib cannot lower Pallas to Triton: {e}") from e
    if not hasattr(lowering, "lower_jaxpr_to_triton_module"):
        raise CompileCheckError(
            "jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module is gone in jax "
            f"{jax.__version__}: update pallas_kernels.compile_check"
        )
    return lowering


@contextlib.contextmanager
def capture_triton_modules() -> Iterator[list[TritonKernel]]:
    """Collects (and verifies) every Triton module Pallas builds while the block runs.

    Hooks the private ``lower_jaxpr_to_triton_module`` of ``jax._src.pallas.triton.lowering``
    (the one place every Pallas GPU kernel passes through on its way to Triton).
    """
    lowering = _triton_lowering_module()
    original = lowering.lower_jaxpr_to_triton_module
    found: list[TritonKernel] = []

    def hooked(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        op = result.module.operation
        name = str(op.attributes["sym_name"]).strip('"')
        try:
            op.verify()
            ok, error = True, None
        except Exception as e:  # MLIRError: the verifier's diagnostics
            ok, error = False, str(e)
        found.append(TritonKernel(name, ok, error, op.get_asm(large_elements_limit=16)))
        return result

    lowering.lower_jaxpr_to_triton_module = hooked
    try:
        yield found
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def lower_for_gpu(
    fn: Callable[..., Any], *args: Any, platform: str = "cuda", expect_kernels: int = 1
) -> list[TritonKernel]:
    """Lowers ``fn(*args)`` for ``platform`` and returns the verified Triton kernels in it.

    Raises ``CompileCheckError`` when a kernel fails the MLIR verifier, the lowering itself
    fails, or fewer than ``expect_kernels`` Pallas kernels were lowered (e.g. the call ran in
    interpret mode, or a cached lowering was reused: call ``jax.clear_caches()`` first).
    """
    with capture_triton_modules() as kernels:
        try:
            # A fresh function each time: a lowering cached for ``fn`` would skip the hook.
            jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,))
        except Exception as e:
            raise CompileCheckError(f"{platform} lowering failed: {e}") from e
    bad = [k for k in kernels if not k.ok]
    if bad:
        raise CompileCheckError(
            "Triton verifier rejected " + ", ".join(k.name for k in bad) + ":\n"
            + "\n".join(k.error[:2000] for k in bad)
        )
    if len(kernels) < expect_kernels:
        raise CompileCheckError(
            f"expected >= {expect_kernels} Pallas kernels, lowered {len(kernels)} (interpret "
            "mode, or a cached lowering?)"
        )
    return kernels
