"""Banded flash attention for TPU (Mosaic Pallas), forward and backward, with sinks.

Layout inside the kernels is heads-major ([B, H, T, D]); q/k/v are padded to block multiples
and the result sliced back. Every grid has a short innermost axis that walks only the blocks
intersecting the band: the index maps read ``q_offset`` (scalar prefetch, SMEM) to find the
first block, so with a window of W keys the work is O(T * W) and blocks outside the band are
never fetched. Masking is exact per element (positions, window, segments, padding).

- forward: grid (B, Hq, q blocks, kv steps); online softmax whose running max starts at the
  sink and whose denominator starts at exp(sink - sink) = 1; emits the logsumexp.
- dq: same grid as the forward.
- dk/dv: grid (B, Hkv, kv blocks, G * q steps), so GQA's group sum happens in the accumulator.
- dsinks = -sum_t exp(sink - lse_t) * (do_t . o_t), an O(T) XLA reduction.

Running row statistics (m, l) live in VMEM 128 lanes wide, the layout Mosaic computes with.
The residuals that go through HBM (lse from the forward, delta for the backward) are stored
lane-dense, [B, H, 1, T] (a transpose in VMEM), not [B, H, T, 128]: 128x less memory and
traffic. Blocks of fewer than 128 query rows (short inputs) keep the lane-broadcast layout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG = -0.7 * float(np.finfo(np.float32).max)
LANES = 128
SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block rows. 128 x 128 puts a W=128 band on 2 kv blocks per q block."""

    block_q: int = 128
    block_kv: int = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- band geometry


@dataclasses.dataclass(frozen=True)
class _Geom:
    t: int  # real query rows
    s: int  # real keys
    bq: int
    bk: int
    nq: int  # q blocks
    nk: int  # kv blocks
    window: int | None
    qoff: int | None = None  # the queries' offset when static (same for every row), else None

    @property
    def kv_steps(self) -> int:
        """kv blocks one q block can reach (exact for a static offset: 2, not 3, for a
        128-key window over 128-row blocks starting at 0)."""
        if self.window is None:
            return self.nk
        if self.qoff is not None:
            return max(self._kv_span(iq) for iq in range(self.nq))
        return min(self.nk, _cdiv(self.bq + self.window - 1, self.bk) + 1)

    @property
    def q_steps(self) -> int:
        """q blocks that can see one kv block."""
        if self.window is None:
            return self.nq
        if self.qoff is not None:
            return max(1, max(self._q_span(ik) for ik in range(self.nk)))
        return min(self.nq, _cdiv(self.bk + self.window - 1, self.bq) + 1)

    def _kv_span(self, iq: int) -> int:
        q_first = self.qoff + iq * self.bq
        last = min((q_first + self.bq - 1) // self.bk, self.nk - 1)
        first = min(max(q_first - self.window + 1, 0) // self.bk, self.nk - 1)
        return max(last - first + 1, 1)

    def _q_span(self, ik: int) -> int:
        first = max(ik * self.bk - self.qoff, 0) // self.bq
        reach = ik * self.bk + self.bk + self.window - 2 - self.qoff
        last = -1 if reach < 0 else min(reach // self.bq, self.nq - 1)
        return max(last - first + 1, 0)

    def kv_block(self, qoff, iq, j):
        """(kv block index to fetch, whether it intersects the band) for step j of q block iq."""
        q_first = qoff + iq * self.bq
        last = jnp.minimum((q_first + self.bq - 1) // self.bk, self.nk - 1)
        first = 0 if self.window is None else jnp.maximum(q_first - self.window + 1, 0) // self.bk
        first = jnp.minimum(first, self.nk - 1)
        return jnp.minimum(first + j, jnp.maximum(last, first)), first + j <= last

    def q_block(self, qoff, ik, j):
        """(q block index to fetch, whether it sees the kv block) for step j of kv block ik."""
        first = jnp.maximum(ik * self.bk - qoff, 0) // self.bq
        if self.window is None:
            last = jnp.int32(self.nq - 1)
        else:
            reach = ik * self.bk + self.bk + self.window - 2 - qoff  # last row seeing the block
            last = jnp.where(reach < 0, -1, jnp.minimum(jnp.maximum(reach, 0) // self.bq,
                                                        self.nq - 1))
        idx = jnp.clip(jnp.minimum(first + j, last), 0, self.nq - 1)
        return idx, first + j <= last

    def mask(self, qoff, iq, ik, q_seg_ref, kv_seg_ref):
        """[bq, bk] bool for q block iq against kv block ik."""
        row = iq * self.bq + jax.lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 0)
        col = ik * self.bk + jax.lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 1)
        q_pos = qoff + row
        allowed = (col <= q_pos) & (col < self.s) & (row < self.t)
        if self.window is not None:
            allowed &= col > q_pos - self.window
        if q_seg_ref is not None:
            q_seg = q_seg_ref[:, :1]
            allowed &= (q_seg == kv_seg_ref[:1, :]) & (q_seg != 0)
        return allowed


def _compact(bq: int) -> bool:
    """Row statistics stored lane-dense (needs whole 128-lane rows per q block)."""
    return bq % LANES == 0


def _put_rows(ref, col, compact):
    """Store a [bq, 1] column of row statistics into its residual block."""
    if compact:  # [bq, 1] -> [bq, 128] -> transpose -> one [1, bq] row
        ref[...] = jnp.broadcast_to(col, (col.shape[0], LANES)).T[:1, :]
    else:
        ref[...] = jnp.broadcast_to(col, ref.shape)


def _get_rows(ref, compact):
    """The [bq, 1] column of row statistics from a residual block."""
    if compact:
        row = ref[...]
        return jnp.broadcast_to(row, (LANES, row.shape[-1])).T[:, :1]
    return ref[:, :1]


def _scores(q_ref, k_ref, scale):
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return s * scale


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(qoff_ref, sinks_ref, q_ref, k_ref, v_ref, *rest, geom, scale, has_sinks, has_seg):
    if has_seg:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    else:
        q_seg_ref = kv_seg_ref = None
        o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    b, h, iq, j = (pl.program_id(i) for i in range(4))
    qoff = qoff_ref[b]

    @pl.when(j == 0)
    def _init():
        if has_sinks:  # the sink is the first "key": max = sink, denominator exp(0) = 1
            m_scr[...] = jnp.full(m_scr.shape, sinks_ref[h], jnp.float32)
            l_scr[...] = jnp.ones(l_scr.shape, jnp.float32)
        else:
            m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
            l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    ik, run = geom.kv_block(qoff, iq, j)

    @pl.when(run)
    def _step():
        allowed = geom.mask(qoff, iq, ik, q_seg_ref, kv_seg_ref)
        s = jnp.where(allowed, _scores(q_ref, k_ref, scale), NEG)
        m_prev = m_scr[:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_new = corr * l_scr[:, :1] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_scr[...] = corr * acc_scr[...] + pv
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

    @pl.when(j == geom.kv_steps - 1)
    def _finish():
        denom = l_scr[:, :1]
        empty = denom == 0.0  # no key and no sink: zeros out, lse unused (p is masked to 0)
        safe = jnp.where(empty, 1.0, denom)
        o_ref[...] = (acc_scr[...] / safe).astype(o_ref.dtype)
        lse = jnp.where(empty, 0.0, m_scr[:, :1] + jnp.log(safe))
        _put_rows(lse_ref, lse, _compact(geom.bq))


def _probs_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, allowed, scale, compact):
    s = _scores(q_ref, k_ref, scale)
    p = jnp.where(allowed, jnp.exp(s - _get_rows(lse_ref, compact)), 0.0)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    ds = p * (dp - _get_rows(delta_ref, compact)) * scale
    return p, ds


def _dq_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, geom, scale,
               has_seg):
    if has_seg:
        q_seg_ref, kv_seg_ref, dq_ref, dq_scr = rest
    else:
        q_seg_ref = kv_seg_ref = None
        dq_ref, dq_scr = rest
    b, _, iq, j = (pl.program_id(i) for i in range(4))
    qoff = qoff_ref[b]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    ik, run = geom.kv_block(qoff, iq, j)

    @pl.when(run)
    def _step():
        allowed = geom.mask(qoff, iq, ik, q_seg_ref, kv_seg_ref)
        _, ds = _probs_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, allowed, scale,
                              _compact(geom.bq))
        dq_scr[...] += jnp.dot(ds.astype(k_ref.dtype), k_ref[...],
                               preferred_element_type=jnp.float32)

    @pl.when(j == geom.kv_steps - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(qoff_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, geom, scale,
                has_seg):
    if has_seg:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    else:
        q_seg_ref = kv_seg_ref = None
        dk_ref, dv_ref, dk_scr, dv_scr = rest
    b, _, ik, r = (pl.program_id(i) for i in range(4))
    qoff = qoff_ref[b]
    steps = geom.q_steps

    @pl.when(r == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    iq, run = geom.q_block(qoff, ik, r % steps)

    @pl.when(run)
    def _step():
        allowed = geom.mask(qoff, iq, ik, q_seg_ref, kv_seg_ref)
        p, ds = _probs_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, allowed, scale,
                              _compact(geom.bq))
        t_dims = (((0,), (0,)), ((), ()))  # contract the query rows: p^T @ do, ds^T @ q
        dv_scr[...] += jax.lax.dot_general(p.astype(do_ref.dtype), do_ref[...], t_dims,
                                           preferred_element_type=jnp.float32)
        dk_scr[...] += jax.lax.dot_general(ds.astype(q_ref.dtype), q_ref[...], t_dims,
                                           preferred_element_type=jnp.float32)

    @pl.when(r == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _rows_spec(bq, index_map):
    """BlockSpec of a row-statistics residual whose q block ``index_map`` returns as
    (b, h, iq): [B, H, 1, T] blocks of one lane-dense row, or [B, H, T, 128] blocks."""
    if _compact(bq):
        return pl.BlockSpec((None, None, 1, bq), lambda *a: (*index_map(*a)[:2], 0,
                                                               index_map(*a)[2]))
    return pl.BlockSpec((None, None, bq, LANES), lambda *a: (*index_map(*a), 0))


def _rows_array(x_bht, bq):
    """[B, H, T] row statistics in the residual layout of ``_rows_spec``."""
    if _compact(bq):
        return x_bht[:, :, None, :]
    return jnp.broadcast_to(x_bht[..., None], (*x_bht.shape, LANES))


def _seg_inputs(q_seg, kv_seg, geom, q_idx, kv_idx):
    """Lane-/sublane-broadcast segment ids and their specs (index maps take (b, iq/ik))."""
    tp, sp = geom.nq * geom.bq, geom.nk * geom.bk
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - geom.t)))  # padded rows -> id 0 -> masked
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, sp - geom.s)))
    q_seg = jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, LANES))
    kv_seg = jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], SUBLANES, sp))
    specs = [pl.BlockSpec((None, geom.bq, LANES), q_idx),
             pl.BlockSpec((None, SUBLANES, geom.bk), kv_idx)]
    return [q_seg, kv_seg], specs


def _fwd(q, k, v, sinks, q_seg, kv_seg, qoff, geom, scale, interpret):
    b, hq, tp, dqk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g, bq, bk = hq // hkv, geom.bq, geom.bk

    def kv_map(bi, h, iq, j, qoff_ref, sinks_ref):
        return (bi, h // g, geom.kv_block(qoff_ref[bi], iq, j)[0], 0)

    def q_map(bi, h, iq, j, qoff_ref, sinks_ref):
        return (bi, h, iq, 0)

    in_specs = [pl.BlockSpec((None, None, bq, dqk), q_map),
                pl.BlockSpec((None, None, bk, dqk), kv_map),
                pl.BlockSpec((None, None, bk, dv), kv_map)]
    inputs = [q, k, v]
    if q_seg is not None:
        seg, seg_specs = _seg_inputs(
            q_seg, kv_seg, geom,
            lambda bi, h, iq, j, qo, sk: (bi, iq, 0),
            lambda bi, h, iq, j, qo, sk: (bi, 0, geom.kv_block(qo[bi], iq, j)[0]))
        inputs += seg
        in_specs += seg_specs
    kernel = functools.partial(_fwd_kernel, geom=geom, scale=scale, has_sinks=sinks is not None,
                               has_seg=q_seg is not None)
    sinks_f32 = jnp.zeros((hq,), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, geom.nq, geom.kv_steps),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bq, dv), q_map),
                       _rows_spec(bq, lambda bi, h, iq, *_: (bi, h, iq))],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, hq, tp, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, hq, 1, tp) if _compact(bq) else (b, hq, tp, LANES),
                                        jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="banded_flash_fwd",
    )(qoff, sinks_f32, *inputs)
    return o, (lse[:, :, 0, :] if _compact(bq) else lse[..., 0])  # [B, H, Tp]


def _bwd(q, k, v, q_seg, kv_seg, qoff, do, lse, delta, geom, scale, interpret):
    b, hq, tp, dqk = q.shape
    hkv, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, bq, bk = hq // hkv, geom.bq, geom.bk
    lse, delta = _rows_array(lse, bq), _rows_array(delta, bq)
    seg = q_seg is not None
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    # dq: the forward's grid.
    def q_map(bi, h, iq, j, qo):
        return (bi, h, iq, 0)

    def kv_map(bi, h, iq, j, qo):
        return (bi, h // g, geom.kv_block(qo[bi], iq, j)[0], 0)

    in_specs = [pl.BlockSpec((None, None, bq, dqk), q_map),
                pl.BlockSpec((None, None, bk, dqk), kv_map),
                pl.BlockSpec((None, None, bk, dv), kv_map),
                pl.BlockSpec((None, None, bq, dv), q_map),
                _rows_spec(bq, lambda bi, h, iq, *_: (bi, h, iq)),
                _rows_spec(bq, lambda bi, h, iq, *_: (bi, h, iq))]
    inputs = [q, k, v, do, lse, delta]
    if seg:
        seg_in, seg_specs = _seg_inputs(
            q_seg, kv_seg, geom, lambda bi, h, iq, j, qo: (bi, iq, 0),
            lambda bi, h, iq, j, qo: (bi, 0, geom.kv_block(qo[bi], iq, j)[0]))
        in_specs, inputs = in_specs + seg_specs, inputs + seg_in
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geom=geom, scale=scale, has_seg=seg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hq, geom.nq, geom.kv_steps),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, dqk), q_map),
            scratch_shapes=[pltpu.VMEM((bq, dqk), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="banded_flash_dq",
    )(qoff, *inputs)

    # dk/dv: kv blocks outer, (group head, q step) inner.
    steps = geom.q_steps

    def q_map_t(bi, hk, ik, r, qo):
        return (bi, hk * g + r // steps, geom.q_block(qo[bi], ik, r % steps)[0], 0)

    def kv_map_t(bi, hk, ik, r, qo):
        return (bi, hk, ik, 0)

    in_specs = [pl.BlockSpec((None, None, bq, dqk), q_map_t),
                pl.BlockSpec((None, None, bk, dqk), kv_map_t),
                pl.BlockSpec((None, None, bk, dv), kv_map_t),
                pl.BlockSpec((None, None, bq, dv), q_map_t),
                _rows_spec(bq, lambda *a: q_map_t(*a)[:3]),
                _rows_spec(bq, lambda *a: q_map_t(*a)[:3])]
    inputs = [q, k, v, do, lse, delta]
    if seg:
        seg_in, seg_specs = _seg_inputs(
            q_seg, kv_seg, geom,
            lambda bi, hk, ik, r, qo: (bi, geom.q_block(qo[bi], ik, r % steps)[0], 0),
            lambda bi, hk, ik, r, qo: (bi, 0, ik))
        in_specs, inputs = in_specs + seg_specs, inputs + seg_in
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, geom=geom, scale=scale, has_seg=seg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hkv, geom.nk, g * steps),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, dqk), kv_map_t),
                       pl.BlockSpec((None, None, bk, dv), kv_map_t)],
            scratch_shapes=[pltpu.VMEM((bk, dqk), jnp.float32),
                            pltpu.VMEM((bk, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, sp, dqk), k.dtype),
                   jax.ShapeDtypeStruct((b, hkv, sp, dv), v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="banded_flash_dkv",
    )(qoff, *inputs)
    return dq, dk, dv_


# ----------------------------------------------------------------------------- custom_vjp


def _to_heads_major(x_bthd: jax.Array, rows: int) -> jax.Array:
    x = jnp.pad(x_bthd, ((0, 0), (0, rows - x_bthd.shape[1]), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2)


def _prep(q, k, v, qoff, geom):
    qoff_b = jnp.broadcast_to(jnp.asarray(qoff, jnp.int32), (q.shape[0],))
    return (_to_heads_major(q, geom.nq * geom.bq), _to_heads_major(k, geom.nk * geom.bk),
            _to_heads_major(v, geom.nk * geom.bk), qoff_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attn(q, k, v, sinks, q_seg, kv_seg, qoff, geom, scale, interpret):
    return _attn_fwd(q, k, v, sinks, q_seg, kv_seg, qoff, geom, scale, interpret)[0]


def _attn_fwd(q, k, v, sinks, q_seg, kv_seg, qoff, geom, scale, interpret):
    qh, kh, vh, qoff_b = _prep(q, k, v, qoff, geom)
    oh, lse_bht = _fwd(qh, kh, vh, sinks, q_seg, kv_seg, qoff_b, geom, scale, interpret)
    o = jnp.swapaxes(oh, 1, 2)[:, : geom.t]
    return o, (q, k, v, sinks, q_seg, kv_seg, qoff, o, lse_bht)


def _attn_bwd(geom, scale, interpret, res, do):
    q, k, v, sinks, q_seg, kv_seg, qoff, o, lse_bht = res
    qh, kh, vh, qoff_b = _prep(q, k, v, qoff, geom)
    doh = _to_heads_major(do, geom.nq * geom.bq)
    delta_bth = jnp.einsum("bthv,bthv->bth", do, o, preferred_element_type=jnp.float32)
    delta_bht = jnp.pad(jnp.swapaxes(delta_bth, 1, 2), ((0, 0), (0, 0), (0, lse_bht.shape[-1]
                                                                           - geom.t)))
    dqh, dkh, dvh = _bwd(qh, kh, vh, q_seg, kv_seg, qoff_b, doh, lse_bht, delta_bht, geom,
                         scale, interpret)
    dsinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_bht[..., : geom.t])
        dsinks = -jnp.sum(p_sink * delta_bht[..., : geom.t], axis=(0, 2)).astype(sinks.dtype)
    dq = jnp.swapaxes(dqh, 1, 2)[:, : geom.t]
    dk = jnp.swapaxes(dkh, 1, 2)[:, : geom.s]
    dv = jnp.swapaxes(dvh, 1, 2)[:, : geom.s]
    return dq, dk, dv, dsinks, None, None, None


_attn.defvjp(_attn_fwd, _attn_bwd)


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_sizes", "interpret",
                                             "static_q_offset"))
def pallas_tpu_attention(
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
    static_q_offset: int | None = None,
) -> jax.Array:
    """Banded flash attention (see the module doc).

    ``interpret``: run the kernel in the Pallas interpreter; None = wherever the default
    backend is not a TPU; False compiles it for a TPU even from a CPU host.
    ``static_q_offset``: ``q_offset``'s value when known at trace time (training, prefill
    from 0): the band's grid then has exactly the steps some block needs.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    t, s = q.shape[1], k.shape[1]
    bq = min(block_sizes.block_q, _cdiv(t, SUBLANES) * SUBLANES)
    bk = min(block_sizes.block_kv, _cdiv(s, SUBLANES) * SUBLANES)
    geom = _Geom(t=t, s=s, bq=bq, bk=bk, nq=_cdiv(t, bq), nk=_cdiv(s, bk), window=window,
                 qoff=static_q_offset)
    return _attn(q, k, v, sinks, q_segment_ids, kv_segment_ids, q_offset, geom, scale, interpret)
