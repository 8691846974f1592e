"""TPU kernels AOT-compiled on this CPU host with libtpu's compile-only devices.

Interpret mode never runs Mosaic; here every Pallas TPU kernel, forward and backward, at the
release's shapes, goes through the real Mosaic compiler (which rejects VMEM overflows and
layouts it cannot handle) and XLA:TPU, for v5e, v5p and v6e, and the scratch memory XLA
reports for the whole call is held to a budget.
"""

from __future__ import annotations

import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compile_check import (
    CompileCheckError,
    MemoryUse,
    compile_for_tpu,
    tpu_available,
)
from pallas_kernels.release_shapes import ATTENTION_CASES, DECODE_CASES, RAGGED_CASES

# libtpu ships for Linux x86-64 only (the `test` extra installs it there); elsewhere these
# checks cannot run at all, which is a different thing from failing.
_LIBTPU_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(not _LIBTPU_PLATFORM, reason="libtpu is Linux x86-64 only")

GENERATIONS = ["v5e", "v5p", "v6e"]
MIB = 1 << 20


def test_libtpu_installed():
    """On Linux x86-64 the test extra installs libtpu: its absence is a failure, not a skip."""
    assert tpu_available(), "no libtpu: pip install -e '.[test]' -c constraints.txt"


def _nbytes(args) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args))


def attention_budget(case, backward: bool) -> int:
    """Scratch XLA may use around the kernels: the heads-major copies of the inputs, outputs
    and their gradients (Mosaic wants [B, H, T, D]), plus compact row statistics."""
    io = _nbytes(case.args())
    return int((3.0 if backward else 2.0) * io) + 16 * MIB


# The slow set adds the full-causal segment-id case (same kernels, other masking).
_FAST = [c for c in ATTENTION_CASES if not (c.window is None and c.segments)]
_SLOW = [c for c in ATTENTION_CASES if c not in _FAST]


def _check_attention(gen, case):
    fwd = MemoryUse.of(compile_for_tpu(case.forward("pallas_tpu"), *case.args(), topology=gen))
    bwd = MemoryUse.of(compile_for_tpu(case.backward("pallas_tpu"), *case.args(),
                                       topology=gen))
    assert fwd.temp <= attention_budget(case, False), (fwd, attention_budget(case, False))
    assert bwd.temp <= attention_budget(case, True), (bwd, attention_budget(case, True))


@pytest.mark.parametrize("case", _FAST, ids=lambda c: c.name)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_attention_compiles(gen, case):
    _check_attention(gen, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW, ids=lambda c: c.name)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_attention_compiles_slow(gen, case):
    _check_attention(gen, case)


@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_ragged_compiles(gen, case):
    """The grouped matmul needs no scratch beyond its tiles: nothing near the weights' size."""
    fwd = MemoryUse.of(compile_for_tpu(case.forward("pallas_tpu"), *case.args(), topology=gen))
    bwd = MemoryUse.of(compile_for_tpu(case.backward("pallas_tpu"), *case.args(),
                                       topology=gen))
    rows_bytes = 2 * case.rows * (case.k + case.n)  # x and dy (XLA may relayout one)
    assert fwd.temp <= 4 * MIB, fwd
    assert bwd.temp <= rows_bytes + 4 * MIB, bwd


@pytest.mark.parametrize("gen", GENERATIONS)
def test_ragged_tiles_per_generation(gen):
    """Default tiles fit the generation's scoped VMEM and cut the grid ~50x vs 128-cubed
    tiles at the release's shape; Mosaic agrees (the compiles above use these tiles)."""
    from pallas_kernels.ragged.pallas_tpu import default_tiling, grid_steps, vmem_bytes
    from pallas_kernels.tpu_generation import scoped_vmem_bytes

    for case in RAGGED_CASES:
        shape = (case.rows, case.k, case.n, case.experts)
        tiles = default_tiling(*shape, generation=gen)
        assert max(vmem_bytes(tiles).values()) <= scoped_vmem_bytes(gen)
        assert grid_steps(*shape, tiles) * 50 <= grid_steps(*shape, (128, 128, 128))
    # Large groups get larger row tiles; float32 inputs get smaller K/N tiles.
    assert default_tiling(65536, 4096, 2048, 32, generation=gen)[0] == 512
    f32 = default_tiling(65536, 4096, 2048, 32, itemsize=4, generation=gen)
    assert max(vmem_bytes(f32, 4).values()) <= 3 * scoped_vmem_bytes(gen) // 4


def test_mosaic_rejection_is_reported():
    """A kernel Mosaic cannot compile (a VMEM block far over any generation's VMEM) fails the
    check with the compiler's reason, not silently."""
    from jax.experimental import pallas as pl

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def f(x):  # one 64 MiB block: over any generation's scoped VMEM limit
        return pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              interpret=False)(x)

    with pytest.raises(CompileCheckError, match="(?i)vmem|memory|exceed"):
        compile_for_tpu(f, jax.ShapeDtypeStruct((4096, 4096), jnp.float32), topology="v5e")


def _decode_loop(case, steps: int = 3):
    """`steps` decode steps in one executable, the cache a donated loop carry, as in
    generation's loop: attend, then write the new keys into their slots."""
    f = case.forward("pallas_tpu")

    def loop(q, k_cache, v_cache, cache_pos, k_new, v_new, new_pos, q_offset, length, sinks):
        def body(i, carry):
            kc, vc, acc = carry
            o = f(q, kc, vc, cache_pos, k_new, v_new, new_pos, q_offset + i, length, sinks)
            slot = (q_offset[0] + i) % case.slots
            kc = jax.lax.dynamic_update_slice(kc, jnp.swapaxes(k_new, 1, 2), (0, 0, slot, 0))
            vc = jax.lax.dynamic_update_slice(vc, jnp.swapaxes(v_new, 1, 2), (0, 0, slot, 0))
            return kc, vc, acc + o.astype(jnp.float32)

        init = (k_cache, v_cache, jnp.zeros(q.shape[:3] + (v_cache.shape[-1],), jnp.float32))
        return jax.lax.fori_loop(0, steps, body, init)

    return loop


def _computation(hlo: str, name: str) -> str:
    """The text of HLO computation `name` (up to the next blank line)."""
    start = re.search(rf"^(ENTRY )?%{re.escape(name)} .*{{$", hlo, re.M)
    assert start, name
    return hlo[start.start(): hlo.find("\n\n", start.start())]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_decode_attention_compiles(gen, case):
    """Generation's cached attention (the TPU default) through Mosaic, inside a decode loop
    whose carry is the cache. XLA:TPU's default layout for a [.., S, 192] bf16 entry parameter
    puts S minor (192 would pad to 256 lanes) while the kernel reads row-major blocks: the
    cache is relaid once when the executable starts (scratch of one K cache), never per step
    (no copy of a cache-shaped buffer inside the loop body)."""
    compiled = compile_for_tpu(_decode_loop(case), *case.args(), topology=gen,
                               donate_argnums=(1, 2))
    hlo = compiled.as_text()
    (body,) = set(re.findall(r"while\(.*?body=%([\w.\-]+)", hlo))
    shape = ",".join(map(str, case.args()[1].shape[:3]))
    copies = [ln for ln in _computation(hlo, body).splitlines()
              if re.search(rf"= bf16\[{shape},\d+\]\S* copy\(", ln)]
    assert not copies, copies
    k_bytes = _nbytes(case.args()[1:2])
    assert MemoryUse.of(compiled).temp <= k_bytes * 4 // 3 + 8 * MIB


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_cache_partials_compile(gen, case):
    """Context-parallel decoding's per-device cache pass (o, lse partials) through Mosaic and
    XLA:TPU; its scratch stays within a copy of the cache (the entry relayout) and the
    float32 partials."""
    compiled = compile_for_tpu(case.partials("pallas_tpu"), *case.partial_args(), topology=gen)
    out = _nbytes(jax.eval_shape(case.partials("pallas_tpu"), *case.partial_args()))
    budget = _nbytes(case.args()[1:3]) + 2 * out + 8 * MIB
    assert MemoryUse.of(compiled).temp <= budget, (MemoryUse.of(compiled), budget)
