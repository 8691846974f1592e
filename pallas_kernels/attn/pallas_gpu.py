"""Banded flash attention for GPU (Pallas, Triton lowering), forward and backward, with sinks.

The idiom of ``jax.experimental.pallas.ops.gpu.attention``: one program per (q block, batch,
head) holds its q tile and ``fori_loop``s over the kv blocks; here the loop bounds come from
``q_offset`` and the window, so only blocks intersecting the band are visited (O(T * W)).

Head dims: Triton tensors must have power-of-two sizes, but the release's q/k head dim is 192.
Rather than pad it to 256 (a third more QK work and traffic), q/k are padded only to a
multiple of 16 and every q.k product is a sum of dots over power-of-two column chunks
(192 = 128 + 64); dq and dk are produced chunk by chunk the same way. The v head dim is padded
to a power of two (128 in the release: no padding). T / S are padded to block multiples.

Backward: a dq kernel (same loop as the forward) and a dk/dv kernel with one program per
(kv block, batch, KV head) that loops over the query heads of its group and, for each, over
the q blocks seeing the kv block: GQA's group sum happens in registers, and dk/dv are written
once per KV head in the inputs' dtype (no [B, S, Hq, D] float32 intermediate).
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
MIN_DOT = 16  # Triton dots need every dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Powers of two. Defaults from a sweep on one H200 (jax 0.11.2; sliding window 129,
    T = 16K, 64/8 heads, q/k 192, v 128, bf16; benchmarks/gpu.py): forward 64 x 32 ran
    0.99 ms vs 1.12 ms for 64 x 64; backward 64 x 32 ran ~1.9 ms vs ~2.6 ms for 32 x 32."""

    block_q: int = 64
    block_kv: int = 32
    block_q_bwd: int = 64
    block_kv_bwd: int = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, m: int) -> int:
    return _cdiv(n, m) * m


def head_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(start, width) power-of-two column chunks covering ``d`` rounded up to 16."""
    rest, start, out = _round_up(d, MIN_DOT), 0, []
    while rest:
        width = 1 << (rest.bit_length() - 1)
        out.append((start, width))
        start, rest = start + width, rest - width
    return tuple(out)


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


def _qk(q_chunks, k_chunks):
    """q . k^T summed over the head-dim chunks (float32)."""
    s = None
    for q_c, k_c in zip(q_chunks, k_chunks, strict=True):
        part = plgpu.dot(q_c, k_c, trans_b=True)
        s = part if s is None else s + part
    return s


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(qoff_ref, sink_ref, q_ref, k_ref, v_ref, *rest, geom, scale, has_sinks, has_seg,
                chunks):
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = _split(rest, has_seg)
    iq = pl.program_id(0)
    qoff = qoff_ref[0]
    q_chunks = [q_ref[:, pl.ds(c0, cw)] for c0, cw in chunks]
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
        s = _qk(q_chunks, [k_ref[sl, pl.ds(c0, cw)] for c0, cw in chunks])
        s = jnp.where(allowed, s * scale, NEG)
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


def _probs_and_ds(s, do, v, lse, delta, allowed, scale):
    """Softmax probabilities from the scores and lse, and dS (scaled) from dO . V^T."""
    p = jnp.where(allowed, jnp.exp(s * scale - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v, trans_b=True)
    return p, p * (dp - delta[:, None]) * scale


def _dq_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, geom, scale,
               has_seg, chunks):
    q_seg_ref, kv_seg_ref, (dq_ref,) = _split(rest, has_seg)
    iq = pl.program_id(0)
    qoff = qoff_ref[0]
    q_chunks = [q_ref[:, pl.ds(c0, cw)] for c0, cw in chunks]
    do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def body(ik, dq):
        sl = pl.ds(ik * geom.bk, geom.bk)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[sl]
        k_chunks = [k_ref[sl, pl.ds(c0, cw)] for c0, cw in chunks]
        allowed = geom.mask(qoff, iq, ik, q_seg, kv_seg)
        s = _qk(q_chunks, k_chunks)
        _, ds = _probs_and_ds(s, do, v_ref[sl, :], lse, delta, allowed, scale)
        ds = ds.astype(k_chunks[0].dtype)
        return tuple(d + plgpu.dot(ds, k_c) for d, k_c in zip(dq, k_chunks, strict=True))

    lo, hi = geom.kv_range(qoff, iq)
    zeros = tuple(jnp.zeros((geom.bq, cw), jnp.float32) for _, cw in chunks)
    dq = jax.lax.fori_loop(lo, hi, body, zeros)
    for (c0, cw), d in zip(chunks, dq, strict=True):
        dq_ref[:, pl.ds(c0, cw)] = d.astype(dq_ref.dtype)


def _dkv_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, geom, scale,
                has_seg, chunks, group):
    q_seg_ref, kv_seg_ref, (dk_ref, dv_ref) = _split(rest, has_seg)
    ik = pl.program_id(0)
    qoff = qoff_ref[0]
    k_chunks = [k_ref[:, pl.ds(c0, cw)] for c0, cw in chunks]
    v = v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    lo, hi = geom.q_range(qoff, ik)

    def head(hh, carry):  # one query head of this KV head's group
        def body(iq, carry):
            dk, dv = carry
            sl = pl.ds(iq * geom.bq, geom.bq)
            q_seg = None if q_seg_ref is None else q_seg_ref[sl]
            q_chunks = [q_ref[sl, hh, pl.ds(c0, cw)] for c0, cw in chunks]
            do = do_ref[sl, hh, :]
            allowed = geom.mask(qoff, iq, ik, q_seg, kv_seg)
            s = _qk(q_chunks, k_chunks)
            p, ds = _probs_and_ds(s, do, v, lse_ref[hh, sl], delta_ref[hh, sl], allowed,
                                  scale)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            ds = ds.astype(q_chunks[0].dtype)
            dk = tuple(d + plgpu.dot(ds, q_c, trans_a=True)
                       for d, q_c in zip(dk, q_chunks, strict=True))
            return dk, dv

        return jax.lax.fori_loop(lo, hi, body, carry)

    zeros = (tuple(jnp.zeros((geom.bk, cw), jnp.float32) for _, cw in chunks),
             jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, group, head, zeros)
    for (c0, cw), d in zip(chunks, dk, strict=True):
        dk_ref[:, pl.ds(c0, cw)] = d.astype(dk_ref.dtype)
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
                               has_seg=q_seg is not None, chunks=head_chunks(dqk))
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
    chunks = head_chunks(dqk)
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
        functools.partial(_dq_kernel, geom=geom, scale=scale, has_seg=seg, chunks=chunks),
        grid=(geom.nq, b, hq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, dqk), lambda i, bi, h: (bi, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(bq, bk),
        interpret=interpret,
        name="banded_flash_dq_gpu",
    )(*inputs)
    # dk/dv: one program per (kv block, batch, KV head), looping over its group's query heads.
    in_specs = [
        pl.BlockSpec((1,), lambda i, bi, hk: (bi,)),
        pl.BlockSpec((None, tp, g, dqk), lambda i, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((None, bk, None, dqk), lambda i, bi, hk: (bi, i, hk, 0)),
        pl.BlockSpec((None, bk, None, dv), lambda i, bi, hk: (bi, i, hk, 0)),
        pl.BlockSpec((None, tp, g, dv), lambda i, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((None, g, tp), lambda i, bi, hk: (bi, hk, 0)),
        pl.BlockSpec((None, g, tp), lambda i, bi, hk: (bi, hk, 0)),
    ]
    inputs = [qoff, q, k, v, do, lse, delta]
    if seg:
        in_specs += [pl.BlockSpec((None, tp), lambda i, bi, hk: (bi, 0)),
                     pl.BlockSpec((None, bk), lambda i, bi, hk: (bi, i))]
        inputs += [q_seg, kv_seg]
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, geom=geom, scale=scale, has_seg=seg, chunks=chunks,
                          group=g),
        grid=(geom.nk, b, hkv),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, dqk), lambda i, bi, hk: (bi, i, hk, 0)),
                   pl.BlockSpec((None, bk, None, dv), lambda i, bi, hk: (bi, i, hk, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(bq, bk),
        interpret=interpret,
        name="banded_flash_dkv_gpu",
    )(*inputs)
    return dq, dk, dv_


# ----------------------------------------------------------------------------- custom_vjp


def _prep(q, k, v, q_seg, kv_seg, qoff, geom):
    tp, sp = geom.nq * geom.bq, geom.nk * geom.bk
    # q/k: a multiple of 16 (chunked dots); v: a power of two (one dot), at least 16.
    dqk, dv = _round_up(q.shape[-1], MIN_DOT), _pow2(max(v.shape[-1], MIN_DOT))
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
    dk = dk[:, : gb.s, :, : k.shape[-1]]
    dv = dv[:, : gb.s, :, : v.shape[-1]]
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

    ``interpret``: run the kernel in the Pallas interpreter; None = wherever the default
    backend is not a GPU; False compiles it for a GPU even from a CPU host.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    t, s = q.shape[1], k.shape[1]
    bs = block_sizes
    geom = _geom(t, s, bs.block_q, bs.block_kv, window)
    bwd_geom = _geom(t, s, bs.block_q_bwd, bs.block_kv_bwd, window)
    return _attn(q, k, v, sinks, q_segment_ids, kv_segment_ids, q_offset, geom, bwd_geom, scale,
                 interpret)
