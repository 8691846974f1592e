"""XLA attention for CPU (and any backend): banded for sliding windows, blockwise otherwise.

Sliding window (``window`` < S): the keys are first shifted so that query i's window is rows
``i .. i + window - 1`` of the shifted array, then each query chunk of C rows gets the few key
chunks its band reaches (concatenated, no gather). Scores are [.., C, L] per chunk with
L ~ C + window, so time and memory are O(T * window). Everything is batched over chunks in a
handful of einsums, which is what XLA:CPU runs fastest.

Full causal (``window`` None or >= S): an online softmax over key chunks, so the [T, S] score
matrix is never materialised. With the query offset known at trace time (training, a prefill
from position 0) the chunks are unrolled (in at most MAX_UNROLLED_CHUNKS groups, a scan inside
each) and each meets only the query rows that causality lets see it (about half the work of
the square at T = S); otherwise a ``lax.scan`` meets every row.

Both paths have a ``jax.custom_vjp`` that saves only the output and the per-row logsumexp
(sinks included) and recomputes probabilities in the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Finite: masked scores stay finite, so exp(m_prev - m_next) never sees inf - inf.
NEG = -0.7 * float(np.finfo(np.float32).max)
# Query rows per lax.map step of the banded path: keeps its [.., C, L] tensors in cache.
GROUP_ROWS = 1024
# Key-chunk groups the full path unrolls to skip causally hidden rows: up to this many chunks
# one each, past it consecutive chunks share a group (a scan, from the group's first visible
# row), so the graph stays this size at any length. XLA's temp memory grows with the group
# count (each slices and updates the full-length softmax state): fwd+bwd of one 8-head layer
# at T = 4096 on CPU, scan 405 MiB; 4 / 8 / 16 groups 477 / 1375 / 1447 MiB.
MAX_UNROLLED_CHUNKS = 4
# Smallest key chunk the unrolled path uses: finer chunks skip more of the hidden triangle
# (one 6-head layer at T = 1024 on CPU, fwd+bwd, measured once: 275 ms scanned, 205 / 166 /
# 142 ms unrolled with 512 / 256 / 128-key chunks) but each is a smaller matmul.
MIN_UNROLLED_CHUNK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- banded geometry


def _band_geometry(t: int, window: int, chunk: int) -> tuple[int, int, int, int]:
    """(C, nc, L, Ls): chunk rows, chunk count, keys per chunk window, shifted key length."""
    c = min(chunk, t)
    nc = _cdiv(t, c)
    if nc == 1:
        length = c + window - 1
        return c, 1, length, length
    nblk = 1 + _cdiv(window - 1, c)  # key chunks one query chunk reaches
    return c, nc, nblk * c, (nc + nblk - 1) * c


def _shift(x_bs: jax.Array, q_offset: jax.Array, window: int, length: int) -> jax.Array:
    """Rows ``q_offset - (window - 1) + arange(length)`` of x along axis 1, zeros outside [0, S).

    Exact for 0 <= q_offset <= S (the padding keeps dynamic_slice from clamping).
    """
    pad = [(0, 0)] * x_bs.ndim
    pad[1] = (window - 1, length)
    x_pad = jnp.pad(x_bs, pad)
    if q_offset.ndim == 0:
        return jax.lax.dynamic_slice_in_dim(x_pad, q_offset, length, axis=1)
    return jax.vmap(lambda row, o: jax.lax.dynamic_slice_in_dim(row, o, length, axis=0))(
        x_pad, q_offset
    )


def _windows(x_bs: jax.Array, q_offset: jax.Array, t: int, window: int, chunk: int) -> jax.Array:
    """[B, S, ...] -> [B, nc, L, ...]: the keys each query chunk's band reaches."""
    c, nc, length, ls = _band_geometry(t, window, chunk)
    x_sh = _shift(x_bs, q_offset, window, ls)
    if nc == 1:
        return x_sh[:, None]
    nblk = length // c
    blocks = x_sh.reshape(x_sh.shape[0], nc + nblk - 1, c, *x_sh.shape[2:])
    return jnp.concatenate([blocks[:, j : j + nc] for j in range(nblk)], axis=2)


def _band_bias(
    t: int, s: int, window: int, chunk: int, q_offset: jax.Array,
    q_seg: jax.Array | None, kv_seg: jax.Array | None,
) -> jax.Array:
    """Additive mask [B or 1, nc, 1, 1, C, L]: 0 where allowed, NEG elsewhere."""
    c, nc, length, _ = _band_geometry(t, window, chunk)
    # Static part: the band itself and padded query rows.
    i_nc = np.arange(nc)[:, None, None] * c + np.arange(c)[None, :, None]
    u_nl = np.arange(nc)[:, None, None] * c + np.arange(length)[None, None, :]
    static = (u_nl - i_nc >= 0) & (u_nl - i_nc < window) & (i_nc < t)
    # Dynamic part: shifted keys that fall outside [0, S).
    off_b = jnp.reshape(q_offset, (-1, 1, 1, 1))
    k_pos = off_b - (window - 1) + jnp.asarray(u_nl)
    allowed = jnp.asarray(static)[None] & (k_pos >= 0) & (k_pos < s)
    if q_seg is not None:
        q_seg_nc = jnp.pad(q_seg, ((0, 0), (0, nc * c - t))).reshape(-1, nc, c, 1)
        kv_seg_nl = _windows(kv_seg, q_offset, t, window, chunk)[:, :, None, :]
        allowed = allowed & (q_seg_nc == kv_seg_nl) & (q_seg_nc != 0)
    return jnp.where(allowed, 0.0, NEG)[:, :, None, None]


def _chunk_q(x_bthd: jax.Array, c: int, nc: int, hkv: int) -> jax.Array:
    """[B, T, H, D] -> [B, nc, C, Hkv, G, D], zero-padding T."""
    b, t, h, d = x_bthd.shape
    x = jnp.pad(x_bthd, ((0, 0), (0, nc * c - t), (0, 0), (0, 0)))
    return x.reshape(b, nc, c, hkv, h // hkv, d)


def _unchunk(x_bnckgd: jax.Array, t: int) -> jax.Array:
    b, nc, c, hkv, g, d = x_bnckgd.shape
    return x_bnckgd.reshape(b, nc * c, hkv * g, d)[:, :t]


# ----------------------------------------------------------------------------- banded fwd / bwd


def _map_chunks(fn, group: int, *arrays):
    """fn over axis 1 (the chunk axis) in groups of ``group`` chunks via ``lax.map``.

    Keeps the [.., C, L] intermediates cache-sized at long T; outputs are chunk-major too.
    """
    nc = arrays[0].shape[1]
    if nc <= group:
        return fn(*arrays)
    ng = _cdiv(nc, group)

    def split(a):
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, ng * group - nc)
        a = jnp.pad(a, pad).reshape(a.shape[0], ng, group, *a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    outs = jax.lax.map(lambda xs: fn(*xs), [split(a) for a in arrays])
    merge = lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], ng * group, *y.shape[3:])[:, :nc]
    return jax.tree.map(merge, outs)


def _band_fwd_core(q_bnckgd, k_bnlkd, v_bnlkv, bias, sink_kg1, scale):
    s_bnkgcl = jnp.einsum(
        "bnckgd,bnlkd->bnkgcl", q_bnckgd, k_bnlkd, preferred_element_type=jnp.float32
    ) * scale + bias
    m = jnp.max(s_bnkgcl, axis=-1)
    if sink_kg1 is not None:
        m = jnp.maximum(m, sink_kg1)
    m = jnp.where(m > 0.5 * NEG, m, 0.0)  # fully masked row: exp(NEG - 0) = 0 below
    p = jnp.exp(s_bnkgcl - m[..., None])
    denom = jnp.sum(p, axis=-1)
    if sink_kg1 is not None:
        denom = denom + jnp.exp(sink_kg1 - m)
    o_bnckgv = jnp.einsum(
        "bnkgcl,bnlkv->bnckgv", p.astype(v_bnlkv.dtype), v_bnlkv,
        preferred_element_type=jnp.float32,
    )
    safe = jnp.where(denom == 0.0, 1.0, denom)
    o_bnckgv = o_bnckgv / jnp.moveaxis(safe, -1, 2)[..., None]
    lse_bnkgc = jnp.where(denom == 0.0, 0.0, m + jnp.log(safe))
    return o_bnckgv, lse_bnkgc


def _band_bwd_core(q_bnckgd, k_bnlkd, v_bnlkv, bias, do_bnckgv, lse_bnkgc, delta_bnkgc, scale):
    s_bnkgcl = jnp.einsum(
        "bnckgd,bnlkd->bnkgcl", q_bnckgd, k_bnlkd, preferred_element_type=jnp.float32
    ) * scale + bias
    p = jnp.exp(s_bnkgcl - lse_bnkgc[..., None])
    dv = jnp.einsum("bnkgcl,bnckgv->bnlkv", p.astype(do_bnckgv.dtype), do_bnckgv,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("bnckgv,bnlkv->bnkgcl", do_bnckgv, v_bnlkv, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_bnkgc[..., None]) * scale
    dq = jnp.einsum("bnkgcl,bnlkd->bnckgd", ds, k_bnlkd, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnkgcl,bnckgd->bnlkd", ds, q_bnckgd, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _sink_kg1(sinks, hq, hkv):
    return None if sinks is None else sinks.astype(jnp.float32).reshape(hkv, hq // hkv, 1)


def _group(chunk: int) -> int:
    return max(1, GROUP_ROWS // chunk)


def _band_fwd(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk):
    b, t, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    c, nc, _, _ = _band_geometry(t, window, chunk)
    q_bnckgd = _chunk_q(q, c, nc, hkv)
    k_bnlkd = _windows(k, q_offset, t, window, chunk)
    v_bnlkv = _windows(v, q_offset, t, window, chunk)
    bias = _band_bias(t, s, window, chunk, q_offset, q_seg, kv_seg)
    core = lambda *a: _band_fwd_core(*a, _sink_kg1(sinks, hq, hkv), scale)
    o_bnckgv, lse_bnkgc = _map_chunks(core, _group(c), q_bnckgd, k_bnlkd, v_bnlkv, bias)
    return _unchunk(o_bnckgv, t).astype(q.dtype), lse_bnkgc


def _band_bwd(q, k, v, sinks, q_seg, kv_seg, q_offset, o, lse_bnkgc, do, window, scale, chunk):
    b, t, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    c, nc, _, _ = _band_geometry(t, window, chunk)
    windows = lambda x: _windows(x, q_offset, t, window, chunk)
    # Transposes of the (linear) windowing, in f32 so overlapping windows sum in f32.
    k_t = jax.linear_transpose(windows, jax.ShapeDtypeStruct(k.shape, jnp.float32))
    v_t = jax.linear_transpose(windows, jax.ShapeDtypeStruct(v.shape, jnp.float32))
    bias = _band_bias(t, s, window, chunk, q_offset, q_seg, kv_seg)
    # delta_i = do_i . o_i = sum_j p_ij dp_ij
    delta_bth = jnp.einsum("bthv,bthv->bth", do, o, preferred_element_type=jnp.float32)
    delta_bnckg = jnp.pad(delta_bth, ((0, 0), (0, nc * c - t), (0, 0))).reshape(b, nc, c, hkv, -1)
    delta_bnkgc = jnp.moveaxis(delta_bnckg, 2, -1)
    core = lambda *a: _band_bwd_core(*a, scale)
    dq, dk, dv = _map_chunks(core, _group(c), _chunk_q(q, c, nc, hkv), windows(k), windows(v),
                             bias, _chunk_q(do, c, nc, hkv), lse_bnkgc, delta_bnkgc)
    dsinks = None
    if sinks is not None:
        dsinks = -jnp.sum(jnp.exp(_sink_kg1(sinks, hq, hkv) - lse_bnkgc) * delta_bnkgc,
                          axis=(0, 1, 4))
        dsinks = dsinks.reshape(hq).astype(sinks.dtype)
    (dk,) = k_t(dk)
    (dv,) = v_t(dv)
    return _unchunk(dq, t).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsinks


# ----------------------------------------------------------------------------- full (key scan)


def _key_chunks(x_bs: jax.Array, ck: int) -> jax.Array:
    """[B, S, ...] -> [nk, B, Ck, ...] zero-padded, scan-major."""
    s = x_bs.shape[1]
    nk = _cdiv(s, ck)
    pad = [(0, 0)] * x_bs.ndim
    pad[1] = (0, nk * ck - s)
    x = jnp.pad(x_bs, pad).reshape(x_bs.shape[0], nk, ck, *x_bs.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _full_bias(j, r, t, s, ck, window, q_offset, q_seg, kv_seg_c):
    """Additive mask [B or 1, T - r, 1, 1, Ck] for key chunk j and query rows r..T-1
    (``q_seg``: those rows' segment ids)."""
    q_pos = jnp.reshape(q_offset, (-1, 1, 1)) + jnp.arange(r, t)[None, :, None]
    k_pos = j * ck + jnp.arange(ck)[None, None, :]
    allowed = (k_pos <= q_pos) & (k_pos < s)
    if window is not None:
        allowed &= k_pos > q_pos - window
    if q_seg is not None:
        allowed &= (q_seg[:, :, None] == kv_seg_c[:, None, :]) & (q_seg[:, :, None] != 0)
    return jnp.where(allowed, 0.0, NEG)[:, :, None, None, :]


def _chunk_groups(t: int, s: int, ck: int, static_q_offset: int | None
                  ) -> list[tuple[int, int, int]] | None:
    """With the query offset known at trace time: (first key chunk, chunk count, first query
    row that can see any of their keys) per group of consecutive key chunks, at most
    MAX_UNROLLED_CHUNKS groups (causality hides a group from every row before its first; T
    for a group no row sees). None (offset traced): every chunk against every row."""
    if static_q_offset is None:
        return None
    nk = _cdiv(s, ck)
    per = _cdiv(nk, MAX_UNROLLED_CHUNKS)
    return [(j, min(per, nk - j), min(t, max(0, j * ck - static_q_offset)))
            for j in range(0, nk, per)]


def _rows(x, r):
    return None if x is None else x[:, r:]


def _rows0(x, j0, n):
    return None if x is None else x[j0:j0 + n]


def _full_fwd_step(q_btkgd, k_c, v_c, bias, m, denom, acc, scale):
    """One key chunk's online-softmax update of (running max, denominator, accumulator)."""
    s_c = jnp.einsum("btkgd,bskd->btkgs", q_btkgd, k_c, preferred_element_type=jnp.float32)
    s_c = s_c * scale + bias
    m_new = jnp.maximum(m, jnp.max(s_c, axis=-1))
    p = jnp.exp(s_c - m_new[..., None])
    p = jnp.where(s_c > 0.5 * NEG, p, 0.0)  # rows with nothing allowed yet
    corr = jnp.exp(m - m_new)
    denom = denom * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum(
        "btkgs,bskv->btkgv", p.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32
    )
    return m_new, denom, acc


def _full_fwd(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk, static_q_offset):
    b, t, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g, dv_ = hq // hkv, v.shape[-1]
    ck = min(chunk, s)
    q_btkgd = q.reshape(b, t, hkv, g, -1)
    kv_seg_chunks = None if kv_seg is None else _key_chunks(kv_seg, ck)
    k_chunks, v_chunks = _key_chunks(k, ck), _key_chunks(v, ck)
    if sinks is None:
        m0 = jnp.full((b, t, hkv, g), NEG, jnp.float32)
        l0 = jnp.zeros((b, t, hkv, g), jnp.float32)
    else:  # the sink starts the running max and contributes exp(sink - m) = 1
        m0 = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(hkv, g), (b, t, hkv, g))
        l0 = jnp.ones((b, t, hkv, g), jnp.float32)
    acc0 = jnp.zeros((b, t, hkv, g, dv_), jnp.float32)

    def scan(r, carry, j0, n):
        """The online-softmax state of query rows r.. after key chunks j0 .. j0+n-1."""
        rows_q, rows_seg = q_btkgd[:, r:], _rows(q_seg, r)

        def step(carry, x):
            j, k_c, v_c, kv_seg_c = x
            bias = _full_bias(j, r, t, s, ck, window, q_offset, rows_seg, kv_seg_c)
            return _full_fwd_step(rows_q, k_c, v_c, bias, *carry, scale), None

        if n == 1:  # no loop: XLA:CPU runs a loop body's ops one at a time
            kv_seg_c = None if kv_seg is None else kv_seg_chunks[j0]
            return step(carry, (j0, k_chunks[j0], v_chunks[j0], kv_seg_c))[0]
        xs = (jnp.arange(j0, j0 + n), k_chunks[j0:j0 + n], v_chunks[j0:j0 + n],
              _rows0(kv_seg_chunks, j0, n))
        return jax.lax.scan(step, carry, xs)[0]

    groups = _chunk_groups(t, s, ck, static_q_offset)
    if groups is None:
        m, denom, acc = scan(0, (m0, l0, acc0), 0, k_chunks.shape[0])
    else:  # unrolled groups, each against only the rows that can see it
        m, denom, acc = m0, l0, acc0
        for j0, n, r in groups:
            if r == t:
                continue
            new = scan(r, (m[:, r:], denom[:, r:], acc[:, r:]), j0, n)
            m, denom, acc = (x.at[:, r:].set(y) for x, y in zip((m, denom, acc), new,
                                                                   strict=True))
    safe = jnp.where(denom == 0.0, 1.0, denom)
    o = (acc / safe[..., None]).reshape(b, t, hq, dv_).astype(q.dtype)
    lse = jnp.where(denom == 0.0, 0.0, m + jnp.log(safe))
    return o, lse


def _full_bwd_step(q_btkgd, do_btkgv, lse_btkg, delta, k_c, v_c, bias, scale):
    """One key chunk's (dq contribution, dk, dv) from the rows given."""
    s_c = jnp.einsum("btkgd,bskd->btkgs", q_btkgd, k_c, preferred_element_type=jnp.float32)
    s_c = s_c * scale + bias
    p = jnp.exp(s_c - lse_btkg[..., None])
    dv_c = jnp.einsum("btkgs,btkgv->bskv", p.astype(do_btkgv.dtype), do_btkgv,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum("btkgv,bskv->btkgs", do_btkgv, v_c, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("btkgs,bskd->btkgd", ds, k_c, preferred_element_type=jnp.float32)
    dk_c = jnp.einsum("btkgs,btkgd->bskd", ds, q_btkgd, preferred_element_type=jnp.float32)
    return dq, dk_c, dv_c


def _full_bwd(q, k, v, sinks, q_seg, kv_seg, q_offset, o, lse_btkg, do, window, scale, chunk,
              static_q_offset):
    b, t, hq, dqk = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    ck = min(chunk, s)
    q_btkgd = q.reshape(b, t, hkv, g, dqk)
    do_btkgv = do.reshape(b, t, hkv, g, -1)
    delta = jnp.einsum("btkgv,btkgv->btkg", do_btkgv, o.reshape(do_btkgv.shape),
                       preferred_element_type=jnp.float32)
    kv_seg_chunks = None if kv_seg is None else _key_chunks(kv_seg, ck)
    k_chunks, v_chunks = _key_chunks(k, ck), _key_chunks(v, ck)

    def scan(r, j0, n):
        """(dq of rows r.., dk and dv [n, ...]) of key chunks j0 .. j0+n-1."""
        rows_q, rows_do, rows_seg = q_btkgd[:, r:], do_btkgv[:, r:], _rows(q_seg, r)

        def step(dq, x):
            j, k_c, v_c, kv_seg_c = x
            bias = _full_bias(j, r, t, s, ck, window, q_offset, rows_seg, kv_seg_c)
            dq_c, dk_c, dv_c = _full_bwd_step(rows_q, rows_do, lse_btkg[:, r:], delta[:, r:],
                                              k_c, v_c, bias, scale)
            return dq + dq_c, (dk_c, dv_c)

        if n == 1:  # no loop: XLA:CPU runs a loop body's ops one at a time
            kv_seg_c = None if kv_seg is None else kv_seg_chunks[j0]
            dq_r, (dk_c, dv_c) = step(jnp.zeros(rows_q.shape, jnp.float32),
                                      (j0, k_chunks[j0], v_chunks[j0], kv_seg_c))
            return dq_r, dk_c[None], dv_c[None]
        xs = (jnp.arange(j0, j0 + n), k_chunks[j0:j0 + n], v_chunks[j0:j0 + n],
              _rows0(kv_seg_chunks, j0, n))
        dq_r, (dk_c, dv_c) = jax.lax.scan(step, jnp.zeros(rows_q.shape, jnp.float32), xs)
        return dq_r, dk_c, dv_c

    groups = _chunk_groups(t, s, ck, static_q_offset)
    if groups is None:
        dq, dk, dv = scan(0, 0, k_chunks.shape[0])
    else:  # unrolled groups, as the forward: each only against the rows that see it
        dq = jnp.zeros(q_btkgd.shape, jnp.float32)
        dks, dvs = [], []
        for j0, n, r in groups:
            if r == t:
                dks.append(jnp.zeros((n, *k_chunks.shape[1:]), jnp.float32))
                dvs.append(jnp.zeros((n, *v_chunks.shape[1:]), jnp.float32))
                continue
            dq_r, dk_c, dv_c = scan(r, j0, n)
            dq = dq.at[:, r:].add(dq_r)
            dks.append(dk_c)
            dvs.append(dv_c)
        dk, dv = jnp.concatenate(dks), jnp.concatenate(dvs)
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, -1, hkv, dqk)[:, :s]
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, -1, hkv, v.shape[-1])[:, :s]
    dsinks = None
    if sinks is not None:
        sink_kg = sinks.astype(jnp.float32).reshape(hkv, g)
        dsinks = -jnp.sum(jnp.exp(sink_kg - lse_btkg) * delta, axis=(0, 1)).reshape(hq)
        dsinks = dsinks.astype(sinks.dtype)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsinks


# ----------------------------------------------------------------------------- custom_vjp


def _use_band(s: int, window: int | None) -> bool:
    # window >= S cannot exclude any key of a query inside [0, S): the full path is cheaper.
    return window is not None and window < s


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attn(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk, static_q_offset):
    return _attn_fwd(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk,
                     static_q_offset)[0]


def _attn_fwd(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk, static_q_offset):
    if _use_band(k.shape[1], window):
        o, lse = _band_fwd(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk)
    else:
        o, lse = _full_fwd(q, k, v, sinks, q_seg, kv_seg, q_offset, window, scale, chunk,
                           static_q_offset)
    return o, (q, k, v, sinks, q_seg, kv_seg, q_offset, o, lse)


def _attn_bwd(window, scale, chunk, static_q_offset, res, do):
    q, k, v, sinks, q_seg, kv_seg, q_offset, o, lse = res
    if _use_band(k.shape[1], window):
        dq, dk, dv, dsinks = _band_bwd(q, k, v, sinks, q_seg, kv_seg, q_offset, o, lse, do,
                                       window, scale, chunk)
    else:
        dq, dk, dv, dsinks = _full_bwd(q, k, v, sinks, q_seg, kv_seg, q_offset, o, lse, do,
                                       window, scale, chunk, static_q_offset)
    return dq, dk, dv, dsinks, None, None, None


_attn.defvjp(_attn_fwd, _attn_bwd)


@functools.partial(jax.jit, static_argnames=("window", "scale", "chunk", "full_chunk",
                                             "static_q_offset"))
def xla_attention(
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
    chunk: int = 64,
    full_chunk: int = 512,
    static_q_offset: int | None = None,
) -> jax.Array:
    """Banded (``window`` set) or key-blockwise (full causal) attention; see the module doc.

    ``chunk`` is the query chunk of the banded path, ``full_chunk`` the key chunk of the full
    path. Assumes 0 <= q_offset <= S (true whenever the queries' keys are all in k/v).
    ``static_q_offset``: ``q_offset`` when it is known at trace time (training, a prefill from
    position 0); the full path then skips the query rows causality hides from each key chunk.
    """
    q_offset = jnp.asarray(q_offset, jnp.int32)
    s = k.shape[1]
    if _use_band(s, window):
        ch = chunk
    elif static_q_offset is None:
        ch = full_chunk
    else:  # as fine as MAX_UNROLLED_CHUNKS allows, never coarser than the scan's chunk
        per = _cdiv(_cdiv(s, MAX_UNROLLED_CHUNKS), MIN_UNROLLED_CHUNK) * MIN_UNROLLED_CHUNK
        ch = min(full_chunk, max(MIN_UNROLLED_CHUNK, per))
    return _attn(q, k, v, sinks, q_segment_ids, kv_segment_ids, q_offset, window, scale, ch,
                 static_q_offset)
