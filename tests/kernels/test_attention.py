"""Attention implementations against the masked reference: outputs and all four gradients."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pallas_kernels.attn import IMPLEMENTATIONS, attention
from pallas_kernels.attn.pallas_gpu import BlockSizes as GpuBlocks
from pallas_kernels.attn.pallas_gpu import pallas_gpu_attention
from pallas_kernels.attn.pallas_tpu import BlockSizes as TpuBlocks
from pallas_kernels.attn.pallas_tpu import pallas_tpu_attention
from pallas_kernels.attn.reference import reference_attention as _reference
from pallas_kernels.attn.xla_banded import xla_attention

# Jitted: eager op-by-op dispatch of the reference costs more than the kernels under test.
reference_attention = jax.jit(_reference, static_argnames=("window", "scale"))

# Small blocks so that tiny shapes still span several blocks and the band skips some.
IMPLS = {
    "xla": functools.partial(xla_attention, chunk=4, full_chunk=8),
    "pallas_tpu": functools.partial(pallas_tpu_attention, block_sizes=TpuBlocks(8, 16),
                                    interpret=True),
    "pallas_gpu": functools.partial(pallas_gpu_attention, block_sizes=GpuBlocks(8, 16, 16, 8),
                                    interpret=True),
}


def _inputs(seed, b, t, s, hq, hkv, dqk, dv, dtype, sinks, segments, q_offset):
    # numpy RNG: jax.random would compile threefry for every new shape (seconds each on CPU).
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
    q, k, v = normal(b, t, hq, dqk), normal(b, s, hkv, dqk), normal(b, s, hkv, dv)
    sk = jnp.asarray(1.5 * rng.standard_normal(hq, np.float32)) if sinks else None
    offsets = np.broadcast_to(np.asarray(q_offset), (b,))
    if segments:  # sorted ids with some padding (id 0) at the front: fully masked rows
        kv_seg = np.sort(rng.integers(0, 4, (b, s)), axis=1).astype(np.int32)
        q_seg = np.stack([row[o : o + t] for row, o in zip(kv_seg, offsets, strict=True)])
        q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    else:
        q_seg = kv_seg = None
    return q, k, v, sk, q_seg, kv_seg, normal(b, t, hq, dv)


def _out_and_grads(impl, q, k, v, sk, q_seg, kv_seg, do, *, window, q_offset):
    kw = dict(window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=q_offset,
              scale=q.shape[-1] ** -0.5)
    out, vjp = jax.vjp(lambda *a: impl(*a[:3], sinks=a[3], **kw), q, k, v, sk)
    return out, vjp(do)


def _close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = np.max(np.abs(got - want), initial=0.0) / max(1.0, np.max(np.abs(want), initial=0.0))
    assert err <= tol, f"{name}: normalised max error {err:.2e} > {tol:.0e}"


def _check(impl, case, dtype):
    b, t, s, hq, hkv, dqk, dv, window, sinks, segments, q_offset, seed = case
    q, k, v, sk, q_seg, kv_seg, do = _inputs(seed, b, t, s, hq, hkv, dqk, dv, dtype, sinks,
                                             segments, q_offset)
    q_off = jnp.asarray(q_offset, jnp.int32)
    got = _out_and_grads(impl, q, k, v, sk, q_seg, kv_seg, do, window=window, q_offset=q_off)
    # The reference runs in float32 on the same (possibly bf16-rounded) inputs.
    f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, sk, do)]
    want = _out_and_grads(reference_attention, *f32[:4], q_seg, kv_seg, f32[4], window=window,
                          q_offset=q_off)
    out_tol, grad_tol = (1e-5, 2e-5) if dtype == jnp.float32 else (2e-2, 6e-2)
    _close("out", got[0], want[0], out_tol)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got[1], want[1], strict=True):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype if name == "dsinks" else g.dtype == dtype
            _close(name, g, w, grad_tol)


@st.composite
def cases(draw, per_batch_offset=False, max_t=24):
    """Shapes with distinct sizes per axis (a transposed axis fails); windows 1/small/>=T/None."""
    b = draw(st.sampled_from([1, 2]))
    hkv = draw(st.sampled_from([1, 3]))
    hq = hkv * draw(st.sampled_from([1, 4]))
    dqk, dv = draw(st.sampled_from([(16, 8), (8, 24)]))
    t = draw(st.integers(1, max_t))
    prefix = draw(st.sampled_from([0, 0, 5, 11]))
    s = prefix + t
    if per_batch_offset and b == 2 and draw(st.booleans()):
        q_offset = [prefix, draw(st.integers(0, prefix))]  # row 1 leaves keys past its queries
    else:
        q_offset = prefix
    window = draw(st.sampled_from([1, 2, 3, 7, t, s + 3, None]))
    sizes = [x for x in (b, t, s, hq, hkv, dqk, dv) if x > 1]
    assume(len(sizes) == len(set(sizes)))
    return (b, t, s, hq, hkv, dqk, dv, window, draw(st.booleans()), draw(st.booleans()), q_offset,
            draw(st.integers(0, 2**16)))


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                      HealthCheck.too_slow])


@settings(max_examples=8, **SETTINGS)
@given(case=cases(per_batch_offset=True, max_t=40))
def test_xla_f32(case):
    _check(IMPLS["xla"], case, jnp.float32)


@settings(max_examples=3, **SETTINGS)
@given(case=cases(per_batch_offset=True, max_t=40))
def test_xla_bf16(case):
    _check(IMPLS["xla"], case, jnp.bfloat16)


@settings(max_examples=8, **SETTINGS)
@given(case=cases(max_t=40))
def test_xla_static_offset_f32(case):
    """The offset known at trace time: the full path meets each key chunk with only the rows
    that can see it (8-key chunks, so up to 7 of them are skipped for some rows)."""
    impl = functools.partial(xla_attention, chunk=4, full_chunk=8, static_q_offset=case[10])
    _check(impl, case, jnp.float32)


@pytest.mark.parametrize("max_unrolled", [1, 2, 16])
def test_xla_static_offset_unrolled_or_scanned(monkeypatch, max_unrolled):
    """Past MAX_UNROLLED_CHUNKS key chunks, consecutive chunks share a group (a scan from the
    group's first visible row): 6 chunks as 1 group of 6, 2 of 3, or 6 of 1. All match the
    reference (bf16, a prefix, GQA, sinks, segments)."""
    import pallas_kernels.attn.xla_banded as xb

    monkeypatch.setattr(xb, "MAX_UNROLLED_CHUNKS", max_unrolled)
    xla_attention.clear_cache()  # compiled under the other setting otherwise
    impl = functools.partial(xla_attention, chunk=4, full_chunk=8, static_q_offset=11)
    case = (2, 37, 48, 12, 3, 16, 8, None, True, True, 11, 5)
    _check(impl, case, jnp.bfloat16)
    q, k, v, sk, q_seg, kv_seg, _ = _inputs(*case[-1:], *case[:7], jnp.bfloat16, *case[8:11])
    jaxpr = str(jax.make_jaxpr(lambda *a: impl(*a, sinks=sk, window=None, q_segment_ids=q_seg,
                                                kv_segment_ids=kv_seg, q_offset=11,
                                                scale=0.25))(q, k, v))
    assert ("scan" in jaxpr) == (max_unrolled < 6)
    xla_attention.clear_cache()


@settings(max_examples=4, **SETTINGS)
@given(case=cases())
def test_pallas_tpu_f32(case):
    _check(IMPLS["pallas_tpu"], case, jnp.float32)


@settings(max_examples=4, **SETTINGS)
@given(case=cases())
def test_pallas_gpu_f32(case):
    _check(IMPLS["pallas_gpu"], case, jnp.float32)


@pytest.mark.parametrize("name", ["pallas_tpu", "pallas_gpu"])
def test_pallas_bf16(name):
    # GQA, sinks, segments, a prefix and a window that straddles blocks, in one bf16 run.
    _check(IMPLS[name], (2, 21, 26, 12, 3, 16, 8, 7, True, True, 5, 3), jnp.bfloat16)


@pytest.mark.parametrize("window", [3, 7, None])
def test_pallas_tpu_static_offset(window):
    """With the offset known at trace time the grid has exactly the steps needed; results
    match the reference (a prefix, GQA, sinks and segments; blocks of 8 x 16)."""
    impl = functools.partial(pallas_tpu_attention, block_sizes=TpuBlocks(8, 16), interpret=True,
                             static_q_offset=11)
    _check(impl, (2, 21, 32, 4, 2, 16, 8, window, True, True, 11, 3), jnp.float32)


def test_pallas_gpu_head_dim_chunks():
    """q/k head dims that are not powers of two (192 in the release) run as a sum of
    power-of-two chunks, never padded to the next power of two; GQA groups reduced in-kernel."""
    from pallas_kernels.attn.pallas_gpu import head_chunks

    assert head_chunks(192) == ((0, 128), (128, 64))
    assert head_chunks(40) == ((0, 32), (32, 16))  # rounded up to 48 = 32 + 16
    _check(IMPLS["pallas_gpu"], (1, 19, 19, 6, 2, 40, 24, 5, True, True, 0, 7), jnp.float32)


@pytest.mark.slow
@settings(max_examples=30, **SETTINGS)
@given(case=cases(max_t=40), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
@pytest.mark.parametrize("name", ["pallas_tpu", "pallas_gpu"])
def test_pallas_sweep_slow(name, case, dtype):
    _check(IMPLS[name], case, dtype)


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(case=cases(per_batch_offset=True, max_t=64),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_xla_sweep_slow(case, dtype):
    _check(IMPLS["xla"], case, dtype)


@pytest.mark.parametrize("name", list(IMPLS))
@pytest.mark.parametrize("sinks", [False, True])
def test_padding_rows_zero_and_finite_grads(name, sinks):
    """Rows with nothing to attend (segment id 0) give zeros, and no gradient is NaN."""
    b, t, hq, hkv, dqk, dv = 1, 13, 6, 2, 16, 8
    q, k, v, sk, _, _, do = _inputs(1, b, t, t, hq, hkv, dqk, dv, jnp.float32, sinks, False, 0)
    seg = jnp.asarray([[0] * 5 + [1] * 4 + [2] * 4], jnp.int32)
    out, grads = _out_and_grads(IMPLS[name], q, k, v, sk, seg, seg, do, window=3,
                                q_offset=jnp.int32(0))
    assert np.all(np.asarray(out[:, :5]) == 0.0)
    for g in (out, *grads):
        if g is not None:
            assert np.all(np.isfinite(np.asarray(g)))
    # Keys of padding get no gradient either.
    assert np.all(np.asarray(grads[1][:, :5]) == 0.0) and np.all(np.asarray(grads[2][:, :5]) == 0)
    want = _out_and_grads(reference_attention, q, k, v, sk, seg, seg, do, window=3,
                          q_offset=jnp.int32(0))
    _close("out", out, want[0], 1e-5)
    for g, w in zip(grads, want[1], strict=True):
        if w is not None:
            _close("grad", g, w, 2e-5)


def test_dispatch_segment_ids_and_offset():
    """The public op slices the queries' segment ids out of [B, S] at q_offset."""
    q, k, v, sk, _, kv_seg, _ = _inputs(2, 2, 6, 15, 4, 1, 16, 8, jnp.float32, True, True, 9)
    got = attention(q, k, v, sinks=sk, window=4, segment_ids=kv_seg, q_offset=9,
                    implementation="xla")
    want = attention(q, k, v, sinks=sk, window=4, segment_ids=kv_seg, q_offset=9,
                     implementation="reference")
    _close("out", got, want, 1e-5)
    assert {"xla", "pallas_tpu", "pallas_gpu", "reference"} <= set(IMPLEMENTATIONS)


def test_banded_geometry_skips_blocks():
    """The kernels' grids/loops cover only the band: far fewer kv blocks than S / block."""
    from pallas_kernels.attn import pallas_gpu, pallas_tpu

    g = pallas_tpu._Geom(t=4096, s=4096, bq=128, bk=128, nq=32, nk=32, window=129)
    assert (g.kv_steps, g.q_steps) == (3, 3)  # static grid: a 256-key span may straddle 3
    runs = [bool(g.kv_block(jnp.int32(0), 20, j)[1]) for j in range(g.kv_steps)]
    assert runs == [True, True, False]  # block-aligned queries: only 2 blocks do work
    fetched = {int(g.kv_block(jnp.int32(0), 20, j)[0]) for j in range(g.kv_steps)}
    assert fetched == {19, 20}  # the skipped step re-uses the last block: no extra DMA
    # A static offset (training, prefill from 0): exactly the 2 blocks every step uses.
    static = pallas_tpu._Geom(t=4096, s=4096, bq=128, bk=128, nq=32, nk=32, window=129, qoff=0)
    assert (static.kv_steps, static.q_steps) == (2, 2)
    shifted = pallas_tpu._Geom(t=4096, s=4196, bq=128, bk=128, nq=32, nk=33, window=129,
                               qoff=100)
    assert (shifted.kv_steps, shifted.q_steps) == (3, 3)  # unaligned: a band spans 3 blocks
    gg = pallas_gpu._geom(4096, 4096, 64, 64, 129)
    lo, hi = gg.kv_range(jnp.int32(0), 40)
    assert int(hi) - int(lo) <= 4
    lo, hi = gg.q_range(jnp.int32(0), 40)
    assert int(hi) - int(lo) <= 4


def test_xla_grouped_chunks(monkeypatch):
    """Long inputs run the band in lax.map groups of chunks; force that on a small shape."""
    xb = __import__("sys").modules["pallas_kernels.attn.xla_banded"]
    monkeypatch.setattr(xb, "GROUP_ROWS", 8)  # chunk 4 -> groups of 2 chunks, T=37 -> 10 chunks
    _check(IMPLS["xla"], (2, 37, 48, 4, 1, 16, 8, 6, True, True, [11, 4], 5), jnp.float32)


def _max_intermediate(jaxpr) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            best = max(best, _max_intermediate(sub))
    return best


@pytest.mark.parametrize("window", [128, None])
def test_xla_path_never_builds_t_by_s(window):
    """T = S = 2048: no forward or backward intermediate is anywhere near [T, S]."""
    t, hq = 2048, 2
    q = jax.ShapeDtypeStruct((1, t, hq, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
    v = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)
    sk = jax.ShapeDtypeStruct((hq,), jnp.float32)

    def loss(q, k, v, sk):
        o = xla_attention(q, k, v, sinks=sk, window=window, q_segment_ids=None,
                          kv_segment_ids=None, q_offset=jnp.int32(0), scale=0.125)
        return jnp.sum(o)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sk).jaxpr
    biggest = _max_intermediate(jaxpr)
    # Banded scores are hq * T * (chunk + band) ~ 0.8M; dense would be hq * T * S = 8.4M.
    limit = hq * t * t // (8 if window else 2)
    assert biggest < limit, (biggest, limit)
