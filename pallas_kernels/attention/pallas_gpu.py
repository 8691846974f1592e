"""Banded flash attention for GPU (Pallas, Triton lowering), forward and backward, with sinks.

The idiom of ``jax.experimental.pallas.ops.gpu.attention``: one program per (q block, batch,
head) holds its q tile and ``fori_loop``s over the kv blocks; here the loop bounds come from
``q_offset`` and the window, so only blocks intersecting the band are visited (O(T * W)).
Triton wants power-of-two tiles, so head dims are zero-padded to powers of two (zeros change
neither q.k nor the kept output columns) and T / S to block multiples; results are sliced back.

Backward: a dq kernel (same loop as the forward) and a dk/dv kernel per *query* head that loops
over the q blocks seeing its kv block; GQA's group sum is an XLA reduction afterwards.
dsinks = -sum_t exp(sink - lse_t) * (do_t . o_t) in XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Powers of two. Forward 64 x 64 keeps a W=128 band at 3 kv blocks per q block."""

    block_q: int = 64
    block_kv: int = 64
    block_q_bwd: int = 32
    block_kv_bwd: int = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class _Geom:
    t: int
    s: int
    nq: int  # q blocks (of bq)
    nk: int  # kv blocks (of bk)
    bq: int
    bk: int
    window: int | None

    def kv_range(self, qoff, iq):
        """[lo, hi) kv blocks reached by q block iq."""
        q_first = qoff + iq * self.bq
        hi = jnp.minimum((q_first + self.bq - 1) // self.bk + 1, self.nk)
        lo = 0 if self.window is None else jnp.maximum(q_first - self.window + 1, 0) // self.bk
        return lo, hi

    def q_range(self, qoff, ik):
        """[lo, hi) q blocks that see kv block ik."""
        lo = jnp.maximum(ik * self.bk - qoff, 0) // self.bq
        if self.window is None:
            return lo, self.nq
        reach = ik * self.bk + self.bk + self.window - 2 - qoff  # last query row seeing it
        hi = jnp.where(reach < 0, 0, jnp.minimum(jnp.maximum(reach, 0) // self.bq + 1, self.nq))
        return lo, hi

    def mask(self, qoff, iq, ik, q_seg, kv_seg):
        row = iq * self.bq + jnp.arange(self.bq)[:, None]
        col = ik * self.bk + jnp.arange(self.bk)[None, :]
        q_pos = qoff + row
        allowed = (col <= q_pos) & (col < self.s) & (row < self.t)
        if self.window is not None:
            allowed &= col > q_pos - self.window
        if q_seg is not None:
            allowed &= (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
        return allowed


def _split(rest, has_seg):
    if has_seg:
        return rest[0], rest[1], rest[2:]
    return None, None, rest


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(qoff_ref, sink_ref, q_ref, k_ref, v_ref, *rest, geom, scale, has_sinks, has_seg):
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = _split(rest, has_seg)
    iq = pl.program_id(0)
    qoff = qoff_ref[0]
    q = q_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    bq, bk = geom.bq, geom.bk
    if has_sinks:  # the sink is the first "key": max = sink, denominator exp(0) = 1
        m0 = jnp.full((bq,), sink_ref[0], jnp.float32)
        l0 = jnp.ones((bq,), jnp.float32)
    else:
        m0 = jnp.full((bq,), NEG, jnp.float32)
        l0 = jnp.zeros((bq,), jnp.float32)
    acc0 = jnp.zeros((bq, v_ref.shape[-1]), jnp.float32)

    def body(ik, carry):
        acc, m, denom = carry
        sl = pl.ds(ik * bk, bk)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[sl]
        allowed = geom.mask(qoff, iq, ik, q_seg, kv_seg)
        s = jnp.where(allowed, plgpu.dot(q, k_ref[sl, :], trans_b=True) * scale, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        denom = corr * denom + jnp.sum(p, axis=1)
        acc = corr[:, None] * acc + plgpu.dot(p.astype(v_ref.dtype), v_ref[sl, :])
        return acc, m_new, denom

    lo, hi = geom.kv_range(qoff, iq)
    acc, m, denom = jax.lax.fori_loop(lo, hi, body, (acc0, m0, l0))
    empty = denom == 0.0  # no key and no sink: zeros out; lse unused since p is masked to 0
    safe = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(safe))


def _ds(q, k, v, do, lse, delta, allowed, scale):
    p = jnp.where(allowed, jnp.exp(plgpu.dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v, trans_b=True)
    return p, p * (dp - delta[:, None]) * scale


def _dq_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, geom, scale,
               has_seg):
    q_seg_ref, kv_seg_ref, (dq_ref,) = _split(rest, has_seg)
    iq = pl.program_id(0)
    qoff = qoff_ref[0]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def body(ik, dq):
        sl = pl.ds(ik * geom.bk, geom.bk)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[sl]
        k = k_ref[sl, :]
        allowed = geom.mask(qoff, iq, ik, q_seg, kv_seg)
        _, ds = _ds(q, k, v_ref[sl, :], do, lse, delta, allowed, scale)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    lo, hi = geom.kv_range(qoff, iq)
    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, geom, scale,
                has_seg):
    q_seg_ref, kv_seg_ref, (dk_ref, dv_ref) = _split(rest, has_seg)
    ik = pl.program_id(0)
    qoff = qoff_ref[0]
    k, v = k_ref[...], v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

    def body(iq, carry):
        dk, dv = carry
        sl = pl.ds(iq * geom.bq, geom.bq)
        q_seg = None if q_seg_ref is None else q_seg_ref[sl]
        q, do = q_ref[sl, :], do_ref[sl, :]
        allowed = geom.mask(qoff, iq, ik, q_seg, kv_seg)
        p, ds = _ds(q, k, v, do, lse_ref[sl], delta_ref[sl], allowed, scale)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo, hi = geom.q_range(qoff, ik)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo, hi, body, zeros)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _pad(x, axis, size):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _params(bq, bk):
    return plgpu.CompilerParams(num_warps=4 if bq * bk <= 64 * 64 else 8, num_stages=2)


def _fwd(q, k, v, sinks, q_seg, kv_seg, qoff, geom, scale, interpret):
    """q [B, Tp, Hq, Dp], k/v [B, Sp, Hkv, Dp/Dvp] padded; returns o [B, Tp, Hq, Dvp], lse."""
    b, tp, hq, dqk = q.shape
    sp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, bq = hq // hkv, geom.bq
    in_specs = [
        pl.BlockSpec((1,), lambda i, bi, h: (bi,)),
        pl.BlockSpec((1,), lambda i, bi, h: (h,)),
        pl.BlockSpec((None, bq, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, sp, None, dqk), lambda i, bi, h: (bi, 0, h // g, 0)),
        pl.BlockSpec((None, sp, None, dv), lambda i, bi, h: (bi, 0, h // g, 0)),
    ]
    sinks_f32 = jnp.zeros((hq,), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    inputs = [qoff, sinks_f32, q, k, v]
    if q_seg is not None:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
                     pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0))]
        inputs += [q_seg, kv_seg]
    kernel = functools.partial(_fwd_kernel, geom=geom, scale=scale, has_sinks=sinks is not None,
                               has_seg=q_seg is not None)
    return pl.pallas_call(
        kernel,
        grid=(geom.nq, b, hq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, hq, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        compiler_params=_params(bq, geom.bk),
        interpret=interpret,
        name="banded_flash_fwd_gpu",
    )(*inputs)


def _bwd(q, k, v, q_seg, kv_seg, qoff, do, lse, delta, geom, scale, interpret):
    b, tp, hq, dqk = q.shape
    sp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, bq, bk = hq // hkv, geom.bq, geom.bk
    seg = q_seg is not None
    # dq: one program per (q block, batch, head), loop over kv blocks.
    in_specs = [
        pl.BlockSpec((1,), lambda i, bi, h: (bi,)),
        pl.BlockSpec((None, bq, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, sp, None, dqk), lambda i, bi, h: (bi, 0, h // g, 0)),
        pl.BlockSpec((None, sp, None, dv), lambda i, bi, h: (bi, 0, h // g, 0)),
        pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
    ]
    inputs = [qoff, q, k, v, do, lse, delta]
    if seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
                     pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0))]
        inputs += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geom=geom, scale=scale, has_seg=seg),
        grid=(geom.nq, b, hq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(bq, bk),
        interpret=interpret,
        name="banded_flash_dq_gpu",
    )(*inputs)
    # dk/dv per query head: one program per (kv block, batch, q head), loop over q blocks.
    in_specs = [
        pl.BlockSpec((1,), lambda i, bi, h: (bi,)),
        pl.BlockSpec((None, tp, None, dqk), lambda i, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, bk, None, dqk), lambda i, bi, h: (bi, i, h // g, 0)),
        pl.BlockSpec((None, bk, None, dv), lambda i, bi, h: (bi, i, h // g, 0)),
        pl.BlockSpec((None, tp, None, dv), lambda i, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, None, tp), lambda i, bi, h: (bi, h, 0)),
        pl.BlockSpec((None, None, tp), lambda i, bi, h: (bi, h, 0)),
    ]
    inputs = [qoff, q, k, v, do, lse, delta]
    if seg:
        in_specs += [pl.BlockSpec((None, tp), lambda i, bi, h: (bi, 0)),
                     pl.BlockSpec((None, bk), lambda i, bi, h: (bi, i))]
        inputs += [q_seg, kv_seg]
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, geom=geom, scale=scale, has_seg=seg),
        grid=(geom.nk, b, hq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
                   pl.BlockSpec((None, bk, None, dv), lambda i, bi, h: (bi, i, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, sp, hq, dqk), jnp.float32),
                   jax.ShapeDtypeStruct((b, sp, hq, dv), jnp.float32)],
        compiler_params=_params(bq, bk),
        interpret=interpret,
        name="banded_flash_dkv_gpu",
    )(*inputs)
    # GQA: sum the per-query-head gradients over each KV head's group.
    dk = dk.reshape(b, sp, hkv, g, dqk).sum(axis=3)
    dv_ = dv_.reshape(b, sp, hkv, g, dv).sum(axis=3)
    return dq, dk, dv_


# ----------------------------------------------------------------------------- custom_vjp


def _prep(q, k, v, q_seg, kv_seg, qoff, geom):
    tp, sp = geom.nq * geom.bq, geom.nk * geom.bk
    dqk, dv = _pow2(q.shape[-1]), _pow2(v.shape[-1])
    qp = _pad(_pad(q, 1, tp), 3, dqk)
    kp = _pad(_pad(k, 1, sp), 3, dqk)
    vp = _pad(_pad(v, 1, sp), 3, dv)
    if q_seg is not None:  # padded rows -> id 0 -> masked
        q_seg, kv_seg = _pad(q_seg, 1, tp), _pad(kv_seg, 1, sp)
    qoff_b = jnp.broadcast_to(jnp.asarray(qoff, jnp.int32), (q.shape[0],))
    return qp, kp, vp, q_seg, kv_seg, qoff_b


def _bwd_geom(geom, bq, bk):
    return dataclasses.replace(geom, bq=bq, bk=bk, nq=_cdiv(geom.t, bq), nk=_cdiv(geom.s, bk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attn(q, k, v, sinks, q_seg, kv_seg, qoff, geom, bwd_geom, scale, interpret):
    return _attn_fwd(q, k, v, sinks, q_seg, kv_seg, qoff, geom, bwd_geom, scale, interpret)[0]


def _attn_fwd(q, k, v, sinks, q_seg, kv_seg, qoff, geom, bwd_geom, scale, interpret):
    qp, kp, vp, q_seg_p, kv_seg_p, qoff_b = _prep(q, k, v, q_seg, kv_seg, qoff, geom)
    op, lse = _fwd(qp, kp, vp, sinks, q_seg_p, kv_seg_p, qoff_b, geom, scale, interpret)
    o = op[:, : geom.t, :, : v.shape[-1]]
    return o, (q, k, v, sinks, q_seg, kv_seg, qoff, o, lse[..., : geom.t])


def _attn_bwd(geom, bwd_geom, scale, interpret, res, do):
    q, k, v, sinks, q_seg, kv_seg, qoff, o, lse_bht = res
    gb = bwd_geom
    qp, kp, vp, q_seg_p, kv_seg_p, qoff_b = _prep(q, k, v, q_seg, kv_seg, qoff, gb)
    tp = gb.nq * gb.bq
    dop = _pad(_pad(do, 1, tp), 3, vp.shape[-1])
    delta_bht = jnp.swapaxes(
        jnp.einsum("bthv,bthv->bth", do, o, preferred_element_type=jnp.float32), 1, 2)
    dq, dk, dv = _bwd(qp, kp, vp, q_seg_p, kv_seg_p, qoff_b, dop, _pad(lse_bht, 2, tp),
                      _pad(delta_bht, 2, tp), gb, scale, interpret)
    dsinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_bht)
        dsinks = -jnp.sum(p_sink * delta_bht, axis=(0, 2)).astype(sinks.dtype)
    dq = dq[:, : gb.t, :, : q.shape[-1]]
    dk = dk[:, : gb.s, :, : k.shape[-1]].astype(k.dtype)
    dv = dv[:, : gb.s, :, : v.shape[-1]].astype(v.dtype)
    return dq, dk, dv, dsinks, None, None, None


_attn.defvjp(_attn_fwd, _attn_bwd)


def _geom(t, s, bq, bk, window):
    bq = min(bq, _pow2(t))
    bk = min(bk, _pow2(s))
    return _Geom(t=t, s=s, nq=_cdiv(t, bq), nk=_cdiv(s, bk), bq=bq, bk=bk, window=window)


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_sizes", "interpret"))
def pallas_gpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sinks: jax.Array | None,
    window: int | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_offset: jax.Array,
    scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
) -> jax.Array:
    """Banded flash attention (see the module doc).

    ``interpret``: run the kernel in the Pallas interpreter; None = only where the default
    backend is the CPU (the sole way it runs there), compiled on a real GPU.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    t, s = q.shape[1], k.shape[1]
    bs = block_sizes
    geom = _geom(t, s, bs.block_q, bs.block_kv, window)
    bwd_geom = _geom(t, s, bs.block_q_bwd, bs.block_kv_bwd, window)
    return _attn(q, k, v, sinks, q_segment_ids, kv_segment_ids, q_offset, geom, bwd_geom, scale,
                 interpret)
