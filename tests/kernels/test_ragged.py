"""Grouped matmul implementations against a per-group jnp loop: output, dx and dw."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels.ragged import IMPLEMENTATIONS, pallas_tpu
from pallas_kernels.ragged.cpu import make_cpu_bucketed
from pallas_kernels.ragged.dispatch import _default_implementation
from pallas_kernels.ragged.pallas_gpu import make_pallas_gpu
from pallas_kernels.ragged.pallas_tpu import make_pallas_tpu
from pallas_kernels.ragged.reference import reference_ragged_matmul

# The kernel module (the package re-exports a function under the same name ``gmm``).
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

# Tiny tiles / blocks so that tiny shapes span several tiles and tiles straddle groups.
IMPLS = {
    "reference": reference_ragged_matmul,
    "cpu_bucketed": make_cpu_bucketed(block=4),
    # The batched part with 3 slots per group (most groups overflow into the loop) and with
    # room for every row (the loop has nothing left to do).
    "cpu_slots3": make_cpu_bucketed(block=4, capacity=3),
    "cpu_slots_all": make_cpu_bucketed(block=4, capacity=64),
    "pallas_tpu": make_pallas_tpu(tiling=(8, 16, 16), interpret=True),
    "pallas_gpu": make_pallas_gpu(tiling=(16, 16, 16), interpret=True),
}
# (input dtype, preferred_element_type)
DTYPES = [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)]


def loop_reference(x, w, sizes, transpose_rhs, out_dtype):
    """Per-group slices and plain matmuls in float32; rows past the sum are zeros."""
    w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    parts, start = [], 0
    for g, size in enumerate(sizes):
        parts.append(jnp.matmul(x[start:start + size], w[g], precision="highest"))
        start += size
    parts.append(jnp.zeros((x.shape[0] - start, w.shape[2]), jnp.float32))
    return jnp.concatenate(parts).astype(out_dtype)


def _case(seed, m, k, n, sizes, transpose_rhs, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    g = len(sizes)
    x = jax.random.normal(ks[0], (m, k)).astype(dtype)
    w = jax.random.normal(ks[1], (g, n, k) if transpose_rhs else (g, k, n)).astype(dtype)
    return x, w, ks[2]


def check(name, seed, m, k, n, sizes, transpose_rhs, dtype, preferred):
    x, w, key = _case(seed, m, k, n, sizes, transpose_rhs, dtype)
    out_dtype = jnp.dtype(preferred or dtype)
    impl = IMPLS[name]
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def fn(x, w):
        return impl(x, w, group_sizes, transpose_rhs=transpose_rhs,
                    preferred_element_type=preferred)

    def ref(x, w):
        return loop_reference(x, w, sizes, transpose_rhs, out_dtype)

    @jax.jit  # one compile per example instead of many eager ops
    def both(x, w, dy):
        y, vjp = jax.vjp(fn, x, w)
        y_ref, vjp_ref = jax.vjp(ref, x, w)
        return (y, *vjp(dy)), (y_ref, *vjp_ref(dy))

    dy = jax.random.normal(key, (m, n)).astype(out_dtype)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = both(x, w, dy)

    assert y.dtype == out_dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    assert y.shape == (m, n) and dx.shape == x.shape and dw.shape == w.shape
    total = sum(sizes)
    # Rows nobody owns: exactly zero (megablox leaves NaN there), zero gradient too.
    np.testing.assert_array_equal(np.asarray(y[total:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(dx[total:], np.float32), 0.0)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


@st.composite
def problems(draw):
    """Distinct M, K, N, G; empty groups; sum(group_sizes) <= M."""
    m = draw(st.integers(1, 40))
    k = draw(st.sampled_from([5, 20, 33]))
    n = draw(st.sampled_from([7, 18, 24]))
    g = draw(st.integers(1, 6))
    assume(len({m, k, n, g}) == 4)
    total = draw(st.sampled_from([m, draw(st.integers(0, m))]))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=g - 1, max_size=g - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    transpose_rhs = draw(st.booleans())
    dtype, preferred = draw(st.sampled_from(DTYPES))
    return m, k, n, sizes, transpose_rhs, dtype, preferred


def _hypothesis_test(name, max_examples):
    @settings(max_examples=max_examples, deadline=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(problem=problems(), seed=st.integers(0, 2**16))
    def test(problem, seed):
        check(name, seed, *problem)

    return test


test_reference_random = _hypothesis_test("reference", 5)
test_cpu_bucketed_random = _hypothesis_test("cpu_bucketed", 6)
test_cpu_slots3_random = _hypothesis_test("cpu_slots3", 6)
test_cpu_slots_all_random = _hypothesis_test("cpu_slots_all", 4)
test_pallas_tpu_random = _hypothesis_test("pallas_tpu", 5)
test_pallas_gpu_random = _hypothesis_test("pallas_gpu", 5)

# Named edge cases every implementation must get right (hypothesis may not draw them).
EDGES = {
    "one_group_holds_all": (37, 20, 13, [0, 37, 0], False, jnp.float32, None),
    "single_group_short": (19, 33, 24, [11], True, jnp.float32, None),
    "straddles_and_empty": (35, 20, 7, [3, 0, 9, 0, 5, 10], False, jnp.bfloat16, jnp.float32),
    "nothing_routed": (12, 5, 18, [0, 0, 0], True, jnp.bfloat16, None),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
@pytest.mark.parametrize("name", sorted(IMPLS))
def test_edges(name, edge):
    check(name, 0, *EDGES[edge])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pallas_tpu", "pallas_gpu", "cpu_bucketed", "cpu_slots3"])
def test_larger_random_slow(name):
    _hypothesis_test(name, 25)()


def test_default_capacity():
    from pallas_kernels.ragged.cpu import default_capacity

    assert default_capacity(4096, 32, 384, 320) == 160  # 1.25 x 128 rows, a multiple of 8
    assert default_capacity(1000, 7, 64, 64) == 184  # 1.25 x 142.9 = 178 -> 184
    assert default_capacity(31 * 8, 8, 64, 64) == 0  # mean under 32 rows: the loop alone
    assert default_capacity(8, 256, 64, 64) == 0  # decoding
    assert default_capacity(8192, 32, 384, 320) == 320  # blocks of 64 rows: 7.9M per dot
    assert default_capacity(32768, 64, 512, 512) == 0  # 128-row dots, 33.6M: the loop
    assert default_capacity(8192, 256, 512, 1024) == 0  # 32-row dots, 2^24 exactly: the loop


def test_default_tiles_and_block_multiple_tiles():
    """Default (unshrunk) tiles / blocks at shapes spanning several of them."""
    sizes = [100, 0, 200, 31, 150]
    cases = {
        "cpu_bucketed": IMPLEMENTATIONS["cpu_bucketed"],
        "pallas_tpu": make_pallas_tpu(tiling=(128, 128, 128), interpret=True),
    }
    for name, impl in cases.items():
        IMPLS[f"_{name}"] = impl
        try:
            check(f"_{name}", 1, 512, 130, 136, sizes, False, jnp.float32, None)
        finally:
            del IMPLS[f"_{name}"]


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_matches_megablox(transpose_rhs):
    """Cross-check with jax's megablox on shapes it supports (M % tm == 0, sum == M)."""
    m, k, n, sizes = 64, 48, 32, [10, 0, 30, 24]
    x, w, key = _case(3, m, k, n, sizes, transpose_rhs, jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    tiling = (16, 16, 16)
    ours = pallas_tpu.gmm(x, w, group_sizes, transpose_rhs, jnp.dtype(jnp.float32),
                          tiling=tiling, interpret=True)
    theirs = megablox.gmm(x, w, group_sizes, jnp.float32, tiling, transpose_rhs=transpose_rhs,
                          interpret=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    dy = jax.random.normal(key, (m, n))
    ours_t = pallas_tpu.tgmm(x, dy, group_sizes, jnp.dtype(jnp.float32), tiling=tiling,
                             interpret=True)
    theirs_t = megablox.tgmm(x.T, dy, group_sizes, jnp.float32, tiling, interpret=True)
    np.testing.assert_allclose(ours_t, theirs_t, atol=1e-4, rtol=1e-4)


def test_dispatch():
    assert _default_implementation() == "cpu_bucketed"  # tests run on CPU (conftest)
    x, w = jnp.ones((6, 4)), jnp.ones((3, 4, 5))
    y = pallas_kernels.ragged_matmul(x, w, jnp.array([2, 0, 3]))
    np.testing.assert_array_equal(y, np.concatenate([np.full((5, 5), 4.0), np.zeros((1, 5))]))
    with pytest.raises(ValueError, match="unknown implementation"):
        pallas_kernels.ragged_matmul(x, w, jnp.array([2, 0, 3]), implementation="nope")
    with pytest.raises(ValueError, match="disagree"):
        pallas_kernels.ragged_matmul(x, w, jnp.array([2, 0, 3]), transpose_rhs=True)


def test_jit_and_grad_through_dispatch():
    """Traced group sizes under jit, gradient through the public entry point."""
    sizes = [3, 4, 0, 2]
    x, w, _ = _case(5, 11, 6, 7, sizes, False, jnp.float32)

    @jax.jit
    def loss(x, w, group_sizes):
        return jnp.sum(pallas_kernels.ragged_matmul(x, w, group_sizes) ** 2)

    got = jax.grad(loss, (0, 1))(x, w, jnp.asarray(sizes, jnp.int32))
    want = jax.grad(lambda x, w: jnp.sum(loop_reference(x, w, sizes, False, jnp.float32) ** 2),
                    (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
