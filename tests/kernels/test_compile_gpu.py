"""GPU kernels lowered for CUDA on this CPU host: Pallas -> Triton MLIR -> the MLIR verifier.

Interpret-mode tests never build Triton IR, so a kernel can pass them all and still not
compile on a GPU (the ragged kernel once typed its loop bound i1). Here every Pallas GPU
kernel, forward and backward, at the release's shapes, is lowered and verified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.compile_check import CompileCheckError, lower_for_gpu
from pallas_kernels.release_shapes import ATTENTION_CASES, DECODE_CASES, RAGGED_CASES


def _loop_kernel(bound_dtype_fix: bool):
    """A kernel whose loop bound comes from ``jnp.where(pred, a, 0)``, as the ragged one did."""

    def kernel(n_ref, x_ref, o_ref):
        if bound_dtype_fix:
            steps = jnp.where(n_ref[0] > 0, jnp.int32(4), jnp.int32(0))
        else:  # Python ints in both branches: lowered as i1 constants
            steps = jnp.where(n_ref[0] > 0, 4, 0)
        o_ref[...] = jax.lax.fori_loop(0, steps, lambda i, acc: acc + x_ref[...],
                                       jnp.zeros((16,), jnp.float32))

    def f(n, x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                              compiler_params=plgpu.CompilerParams(), interpret=False)(n, x)

    return f


def test_verifier_catches_the_i1_loop_bound():
    """The check would have caught the landed ragged bug; the int32 spelling passes."""
    args = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.float32))
    with pytest.raises(CompileCheckError, match="scf.for.*same type"):
        lower_for_gpu(_loop_kernel(False), *args)
    (kernel,) = lower_for_gpu(_loop_kernel(True), *args)
    assert kernel.ok and "scf.for" in kernel.asm


def test_interpret_mode_lowers_no_kernel():
    """Without interpret=False a CPU host interprets: nothing reaches Triton, and we say so."""
    case = RAGGED_CASES[0]

    def f(x, w, group_sizes):
        import pallas_kernels

        return pallas_kernels.ragged_matmul(x, w, group_sizes, implementation="pallas_gpu")

    with pytest.raises(CompileCheckError, match="lowered 0"):
        lower_for_gpu(f, *case.args())


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.name)
def test_attention_lowers_and_verifies(case):
    fwd = lower_for_gpu(case.forward("pallas_gpu"), *case.args())
    assert [k.name for k in fwd] == ["banded_flash_fwd_gpu"]
    bwd = lower_for_gpu(case.backward("pallas_gpu"), *case.args(), expect_kernels=3)
    assert {k.name for k in bwd} >= {"banded_flash_dq_gpu", "banded_flash_dkv_gpu"}
    assert all(k.ok for k in fwd + bwd)


@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: c.name)
def test_ragged_lowers_and_verifies(case):
    fwd = lower_for_gpu(case.forward("pallas_gpu"), *case.args())
    assert [k.name for k in fwd] == ["ragged_gmm_gpu"]
    # The K loop's bound is an i32 select (the landed bug made it i1).
    assert "scf.for" in fwd[0].asm
    bwd = lower_for_gpu(case.backward("pallas_gpu"), *case.args(), expect_kernels=2)
    assert {k.name for k in bwd} == {"ragged_gmm_gpu", "ragged_tgmm_gpu"}


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_decode_attention_lowers_and_verifies(case):
    """Generation's cached attention (the GPU default): its cache kernel reaches Triton."""
    kernels = lower_for_gpu(case.forward("pallas_gpu"), *case.args())
    assert [k.name for k in kernels] == ["cached_attention_gpu"]
    assert all(k.ok for k in kernels)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.name)
def test_cache_partials_lower_and_verify(case):
    """Context-parallel decoding's per-device cache pass (o, lse partials) reaches Triton."""
    kernels = lower_for_gpu(case.partials("pallas_gpu"), *case.partial_args())
    assert [k.name for k in kernels] == ["cached_attention_gpu"]
    assert all(k.ok for k in kernels)
