"""Context parallelism: attention when the sequence is split over the `context` mesh axis.

Layout. With ``n`` context shards a sequence of T tokens is cut into 2n chunks of
``c = T / (2n)`` and shard i holds chunks ``i`` and ``2n-1-i`` (zig-zag): every shard then owns
the same amount of causal attention work (an early chunk with few keys to its left and a late
one with many). `SequenceLayout` moves [.., T, ..] arrays between the natural order and this
order with collective permutes only (each token moves once); the model enters it after
embedding the tokens, carries the RoPE positions and segment ids in the same order, and
leaves it before the final projections, so callers never see it.

Attention per layer type (`context_attention`, inside one ``shard_map``):

* Sliding-window layers (window W): each chunk needs the last W-1 keys/values of the chunk
  before it in the *natural* order, no more. In the zig-zag order chunk i's predecessor is on
  shard i-1 (first halves) and chunk 2n-1-i's on shard i+1 (second halves), except that shard
  n-1's second chunk follows its own first one: two `ppermute`s of W-1 rows (of K, V and the
  segment ids), then the banded kernel (`pallas_kernels.attention`, the same dispatch as one
  device) runs locally on [halo + chunk] with ``q_offset = W-1`` and the per-head sink. The
  first chunk's halo arrives as zeros whose segment id 0 masks it. Communication: 2 (W-1)
  rows per layer, independent of T. When a chunk is shorter than W-1 (tiny T, many shards)
  the halo would span several shards; such layers use the all-gather path below instead.

* Global layers, ``global_attention="allgather"`` (default): all-gather K/V (and segment ids)
  over the context axis, then the kernel for each local chunk at its absolute offset. Each
  device receives (n-1)/n of K/V once, the same bytes a ring moves, in one bandwidth-optimal
  collective, and the attention itself is the tuned kernel (block-skipping on TPU, which is
  what the zig-zag balances). Cost: the gathered K/V of one layer, T x Hkv x (Dqk + Dv), is
  live on every device during that layer. For MiMo-V2-Flash (4 KV heads on the global
  layers, 16 queries per KV head) that is 2,560 B/token in bf16: 0.67 GB at 256K, less than the
  local queries of a long shard; all-gather is the cheaper choice for this model.
* Global layers, ``global_attention="ring"``: K/V blocks travel around the ring (``ppermute``
  to the next shard, n-1 hops) while each shard accumulates an online softmax over them;
  the sink joins the denominator once, after the last block. Memory stays O(T/n) (a custom
  VJP saves only the output and log-sum-exp and runs a second ring in the backward pass, the
  dK/dV accumulators travelling with their blocks and returning home with one extra hop).
  Each step's block attention is plain XLA on a [2c x 2c] score block per head (masked,
  never the [T x T] matrix); with zig-zag, blocks from earlier/later shards are half-size
  (only one chunk is causally visible), so work per step is balanced. It suits many-KV-head
  models or very long T where the gathered K/V would not fit; with the GQA geometry of this
  model all-gather wins.

Gradients of the halo and all-gather paths come from autodiff through ``shard_map``:
``ppermute`` transposes to the inverse permute and ``all_gather`` to a reduce-scatter; the
kernel keeps its own custom VJP (output + log-sum-exp residuals), so nothing quadratic is
saved. The ring has its own custom VJP as above.

Packed documents: segment ids travel with K/V (halo, gather or ring), and masks use each
token's global index, so documents that straddle shard boundaries attend exactly as on one
device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

import pallas_kernels
from mimo_jax.sharding.rules import ShardingError, activation_sharding, active, axis_size
from pallas_kernels.decode import xla as decode_xla
from pallas_kernels.decode.dispatch import cache_partials

GLOBAL_IMPLEMENTATIONS = ("allgather", "ring")
# Finite: masked scores stay finite, so exp(m_prev - m_next) never sees inf - inf.
NEG = -0.7 * float(np.finfo(np.float32).max)

_GLOBAL: contextvars.ContextVar[str] = contextvars.ContextVar("mimo_cp_global",
                                                              default="allgather")


@contextlib.contextmanager
def use_global_attention(name: str) -> Iterator[None]:
    """Global (full-causal) layers traced in this block use ``"allgather"`` or ``"ring"``."""
    if name not in GLOBAL_IMPLEMENTATIONS:
        raise ValueError(f"unknown context-parallel global attention {name!r}; "
                         f"have {GLOBAL_IMPLEMENTATIONS}")
    token = _GLOBAL.set(name)
    try:
        yield
    finally:
        _GLOBAL.reset(token)


# ----------------------------------------------------------------------------- layout


def _seq_axes(mesh, rules) -> tuple[str, ...]:
    return tuple(a for a in rules.mesh_axes("seq") if axis_size(mesh, a) > 1)


def zigzag_chunks(n: int) -> np.ndarray:
    """[n, 2]: the natural chunk index held in each (shard, slot) of the zig-zag layout."""
    i = np.arange(n)
    return np.stack([i, 2 * n - 1 - i], axis=1)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """The zig-zag order of a sequence of length ``t`` over ``n`` context shards."""

    mesh: jax.sharding.Mesh
    rules: object
    axes: tuple[str, ...]  # the mesh axes the sequence is split over
    n: int
    t: int

    @property
    def chunk(self) -> int:
        return self.t // (2 * self.n)

    def _move(self, x: jax.Array, logical_axes: Sequence[str | None], src: np.ndarray,
              dst: np.ndarray) -> jax.Array:
        """Re-lay chunks from layout ``src`` to ``dst`` ([n, 2] chunk ids per shard, slot)."""
        seq_dim = list(logical_axes).index("seq")
        spec = activation_sharding(self.mesh, self.rules, x.shape, logical_axes).spec
        spec = PartitionSpec(*[self.axes if d == seq_dim else s for d, s in enumerate(spec)])
        where = {int(src[s, k]): (s, k) for s in range(self.n) for k in range(2)}
        c = self.chunk

        def local(x_local):
            slots = [jax.lax.slice_in_dim(x_local, k * c, (k + 1) * c, axis=seq_dim)
                     for k in range(2)]
            out = []
            for k_dst in range(2):
                acc = None
                for k_src in range(2):
                    perm = [(where[int(dst[s, k_dst])][0], s) for s in range(self.n)
                            if where[int(dst[s, k_dst])][1] == k_src]
                    if not perm:
                        continue
                    if all(a == b for a, b in perm) and len(perm) == self.n:
                        moved = slots[k_src]
                    else:
                        moved = jax.lax.ppermute(slots[k_src], self.axes, perm)
                    acc = moved if acc is None else acc + moved  # receivers are disjoint
                out.append(acc)
            return jnp.concatenate(out, axis=seq_dim)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(spec,), out_specs=spec,
                             check_vma=False)(x)

    def to_shards(self, x: jax.Array, logical_axes: Sequence[str | None] = ("batch", "seq")
                  ) -> jax.Array:
        """Natural order -> zig-zag order along the axis named "seq" in ``logical_axes``."""
        natural = np.arange(2 * self.n).reshape(self.n, 2)
        return self._move(x, logical_axes, natural, zigzag_chunks(self.n))

    def to_natural(self, x: jax.Array, logical_axes: Sequence[str | None] = ("batch", "seq")
                   ) -> jax.Array:
        natural = np.arange(2 * self.n).reshape(self.n, 2)
        return self._move(x, logical_axes, zigzag_chunks(self.n), natural)

    def outputs_to_natural(self, h_btd: jax.Array, mtp_hidden: jax.Array | None, router):
        """The model's per-token outputs (hidden [B, T, D], MTP hidden [n, B, T, D], the
        router's [L, B, T, K] choices) back in the natural order."""
        per_token = (None, "batch", "seq", None)
        h_btd = self.to_natural(h_btd, ("batch", "seq", "act_embed"))
        if mtp_hidden is not None:
            mtp_hidden = self.to_natural(mtp_hidden, (None, "batch", "seq", "act_embed"))
        if router is not None:
            router = router._replace(
                expert_ids=self.to_natural(router.expert_ids, per_token),
                expert_weights=self.to_natural(router.expert_weights, per_token))
        return h_btd, mtp_hidden, router


_ENTERED: contextvars.ContextVar[SequenceLayout | None] = contextvars.ContextVar(
    "mimo_cp_layout", default=None)


@contextlib.contextmanager
def entered(layout: SequenceLayout | None) -> Iterator[None]:
    """Model code traced in this block holds its sequences in ``layout``'s order (None: the
    natural order). Attention reads this, so code that never entered the layout (decoding,
    a layer called on its own) keeps the plain path."""
    token = _ENTERED.set(layout)
    try:
        yield
    finally:
        _ENTERED.reset(token)


def current_layout(t: int) -> SequenceLayout | None:
    """The entered layout if it is for a length-``t`` sequence on the active mesh."""
    layout, ctx = _ENTERED.get(), active()
    if layout is None or ctx is None or layout.t != t or ctx[0] != layout.mesh:
        return None
    return layout


def sequence_layout(t: int) -> SequenceLayout | None:
    """The zig-zag layout for a length-``t`` sequence under the active mesh, or None when
    there is no context axis (or it is 1), or ``t`` is not a multiple of 2 x context (the
    sequence then stays whole on each device, e.g. one token at a time while decoding)."""
    ctx = active()
    if ctx is None:
        return None
    mesh, rules = ctx
    axes = _seq_axes(mesh, rules)
    n = math.prod(mesh.shape[a] for a in axes)
    if n == 1 or t % (2 * n):
        return None
    return SequenceLayout(mesh, rules, axes, n, t)


# ----------------------------------------------------------------------------- attention


def _chunk_starts(n: int, c: int, axes) -> jax.Array:
    """[2] absolute start of this shard's two chunks (inside shard_map)."""
    i = jax.lax.axis_index(axes)
    return jnp.stack([i, 2 * n - 1 - i]) * c


def _halo_attention(q, k, v, sinks, q_seg, kv_seg, *, window, n, c, axes):
    """Sliding-window layer on one shard: W-1 halo rows from each chunk's predecessor."""
    h = window - 1
    i = jax.lax.axis_index(axes)
    b = q.shape[0]

    def halo(x):  # [b, 2c, ...] -> ([b, h, ...] before slot 0, [b, h, ...] before slot 1)
        tail0, tail1 = x[:, c - h:c], x[:, 2 * c - h:]
        recv0 = jax.lax.ppermute(tail0, axes, [(j, j + 1) for j in range(n - 1)])
        recv1 = jax.lax.ppermute(tail1, axes, [(j + 1, j) for j in range(n - 1)])
        return recv0, jnp.where(i == n - 1, tail0, recv1)

    def with_halo(x):  # -> [2b, h + c, ...]: the two chunks as batch rows
        if h == 0:
            return jnp.concatenate([x[:, :c], x[:, c:]], axis=0)
        h0, h1 = halo(x)
        return jnp.concatenate([jnp.concatenate([h0, x[:, :c]], axis=1),
                                jnp.concatenate([h1, x[:, c:]], axis=1)], axis=0)

    two = lambda x: jnp.concatenate([x[:, :c], x[:, c:]], axis=0)  # noqa: E731
    o = pallas_kernels.attention(
        two(q), with_halo(k), with_halo(v), sinks=sinks, window=window,
        segment_ids=(two(q_seg), with_halo(kv_seg)), q_offset=h)
    return jnp.concatenate([o[:b], o[b:]], axis=1)


def _gather_natural(x, *, n, c, axes):
    """All-gather a [b, 2c, ...] zig-zag shard into the natural [b, 2nc, ...] sequence."""
    g = jax.lax.all_gather(x, axes, axis=1, tiled=False)  # [b, n, 2c, ...]
    g = g.reshape(x.shape[0], n, 2, c, *x.shape[2:])
    first, second = g[:, :, 0], jnp.flip(g[:, :, 1], axis=1)  # chunks 0..n-1, n..2n-1
    return jnp.concatenate([first, second], axis=1).reshape(x.shape[0], 2 * n * c,
                                                            *x.shape[2:])


def _allgather_attention(q, k, v, sinks, q_seg, kv_seg, *, window, n, c, axes):
    """Global (or wide-window) layer on one shard: gathered K/V, the kernel per chunk."""
    k_all, v_all = _gather_natural(k, n=n, c=c, axes=axes), _gather_natural(v, n=n, c=c, axes=axes)
    seg_all = _gather_natural(kv_seg, n=n, c=c, axes=axes)
    starts = _chunk_starts(n, c, axes)
    outs = [
        pallas_kernels.attention(
            q[:, s * c:(s + 1) * c], k_all, v_all, sinks=sinks, window=window,
            segment_ids=(q_seg[:, s * c:(s + 1) * c], seg_all), q_offset=starts[s])
        for s in range(2)
    ]
    return jnp.concatenate(outs, axis=1)


# ------------------------------------------------------------------ ring attention (custom VJP)


def _local_index(n: int, c: int, shard) -> jax.Array:
    """[2c] absolute positions of the tokens of ``shard`` (zig-zag)."""
    r = jnp.arange(c)
    return jnp.concatenate([shard * c + r, (2 * n - 1 - shard) * c + r])


def _block_mask(q_idx, k_idx, q_seg, k_seg, window):
    """[b, 1, 1, tq, tk] bool: causal (+ window) on absolute positions, same non-pad doc."""
    ok = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        ok &= k_idx[None, :] > q_idx[:, None] - window
    ok = ok[None] & (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return ok[:, None, None]


def _scores(q_bkgtd, k_bskd, scale):
    return jnp.einsum("bkgtd,bskd->bkgts", q_bkgtd, k_bskd,
                      preferred_element_type=jnp.float32) * scale


def _ring_case(i, src):
    """Which part of a visiting block is causally visible (zig-zag): 0 = own block (both
    halves, diagonal masks); 1 = an earlier shard's block: only its first chunk, for all local
    queries; 2 = a later shard's block: all of it, for the local second chunk only. Cases 1
    and 2 are half-size, so every shard does the same work per step."""
    return jnp.where(src == i, 0, jnp.where(src < i, 1, 2))


def _fwd_update(q_bkgtd, k_blk, v_blk, q_idx, k_idx, q_seg, k_seg, m, den, acc, window, scale):
    """Online-softmax update of (m, den, acc) for these query rows with these keys."""
    mask = _block_mask(q_idx, k_idx, q_seg, k_seg, window)
    sc = jnp.where(mask, _scores(q_bkgtd, k_blk, scale), NEG)
    m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
    p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    den = den * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum(
        "bkgts,bskv->bkgtv", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    return m_new, den, acc


def _ring_fwd_impl(q, k, v, sinks, q_seg, kv_seg, window, n, c, axes, scale):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    q_bkgtd = jnp.moveaxis(q.reshape(b, t, hkv, g, d), 1, 3)
    i = jax.lax.axis_index(axes)
    q_idx = _local_index(n, c, i)
    ring = [(j, (j + 1) % n) for j in range(n)]
    upd = functools.partial(_fwd_update, window=window, scale=scale)
    lo = lambda x: x[..., :c, :] if x.ndim == 5 else x[..., :c]  # noqa: E731  query rows
    hi = lambda x: x[..., c:, :] if x.ndim == 5 else x[..., c:]  # noqa: E731

    def own(k_blk, v_blk, k_idx, seg_blk, state):
        return upd(q_bkgtd, k_blk, v_blk, q_idx, k_idx, q_seg, seg_blk, *state)

    def earlier(k_blk, v_blk, k_idx, seg_blk, state):
        return upd(q_bkgtd, k_blk[:, :c], v_blk[:, :c], q_idx, k_idx[:c], q_seg,
                   seg_blk[:, :c], *state)

    def later(k_blk, v_blk, k_idx, seg_blk, state):
        new = upd(hi(q_bkgtd), k_blk, v_blk, q_idx[c:], k_idx, q_seg[:, c:], seg_blk,
                  *map(hi, state))
        return tuple(jnp.concatenate([lo(x), y], axis=3) for x, y in zip(state, new,
                                                                        strict=True))

    def step(carry, s):
        k_blk, v_blk, seg_blk, *state = carry
        src = (i - s) % n
        state = jax.lax.switch(_ring_case(i, src), (own, earlier, later), k_blk, v_blk,
                               _local_index(n, c, src), seg_blk, tuple(state))
        k_blk, v_blk, seg_blk = (jax.lax.ppermute(x, axes, ring) for x in (k_blk, v_blk, seg_blk))
        return (k_blk, v_blk, seg_blk, *state), None

    m0 = jnp.full((b, hkv, g, t), NEG, jnp.float32)
    init = (k, v, kv_seg, m0, jnp.zeros_like(m0),
            jnp.zeros((b, hkv, g, t, v.shape[-1]), jnp.float32))
    # The last hop brings every block home; it is the price of a fixed-shape scan body.
    (_, _, _, m, den, acc), _ = jax.lax.scan(step, init, jnp.arange(n))
    if sinks is not None:  # the sink joins the denominator exactly once
        sink = sinks.astype(jnp.float32).reshape(1, hkv, g, 1)
        m_fin = jnp.maximum(m, sink)
        corr = jnp.exp(m - m_fin)
        den, acc = den * corr + jnp.exp(sink - m_fin), acc * corr[..., None]
        m = m_fin
    safe = jnp.where(den == 0.0, 1.0, den)
    o = acc / safe[..., None]
    lse = jnp.where(den == 0.0, jnp.inf, m + jnp.log(safe))  # +inf: p = exp(s - lse) = 0
    out = jnp.moveaxis(o, 3, 1).reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _ring(q, k, v, sinks, q_seg, kv_seg, window, n, c, axes, scale):
    return _ring_fwd_impl(q, k, v, sinks, q_seg, kv_seg, window, n, c, axes, scale)[0]


def _ring_fwd(q, k, v, sinks, q_seg, kv_seg, window, n, c, axes, scale):
    out, lse = _ring_fwd_impl(q, k, v, sinks, q_seg, kv_seg, window, n, c, axes, scale)
    return out, (q, k, v, sinks, q_seg, kv_seg, out, lse)


def _bwd_update(q_bkgtd, do_bkgtv, lse, delta, k_blk, v_blk, q_idx, k_idx, q_seg, k_seg,
                window, scale):
    """(dq for these rows, dk, dv for these keys) of one block, from the saved lse."""
    mask = _block_mask(q_idx, k_idx, q_seg, k_seg, window)
    p = jnp.where(mask, jnp.exp(_scores(q_bkgtd, k_blk, scale) - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgts,bkgtv->bskv", p, do_bkgtv)
    dp = jnp.einsum("bkgtv,bskv->bkgts", do_bkgtv, v_blk.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bkgts,bskd->bkgtd", ds, k_blk.astype(jnp.float32))
    dk = jnp.einsum("bkgts,bkgtd->bskd", ds, q_bkgtd.astype(jnp.float32))
    return dq, dk, dv


def _ring_bwd(window, n, c, axes, scale, res, dout):
    q, k, v, sinks, q_seg, kv_seg, out, lse = res
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    to_bkgt = lambda x: jnp.moveaxis(x.reshape(b, t, hkv, g, x.shape[-1]), 1, 3)  # noqa: E731
    q_bkgtd = to_bkgt(q)
    do_bkgtv = to_bkgt(dout).astype(jnp.float32)
    delta = jnp.sum(do_bkgtv * to_bkgt(out).astype(jnp.float32), axis=-1)  # [b, k, g, t]
    i = jax.lax.axis_index(axes)
    q_idx = _local_index(n, c, i)
    ring = [(j, (j + 1) % n) for j in range(n)]
    upd = functools.partial(_bwd_update, window=window, scale=scale)
    rows = (q_bkgtd, do_bkgtv, lse, delta)
    hi = lambda x: x[..., c:, :] if x.ndim == 5 else x[..., c:]  # noqa: E731  query rows

    def own(k_blk, v_blk, k_idx, seg_blk):
        return upd(*rows, k_blk, v_blk, q_idx, k_idx, q_seg, seg_blk)

    def earlier(k_blk, v_blk, k_idx, seg_blk):  # only the block's first chunk is visible
        dq, dk, dv = upd(*rows, k_blk[:, :c], v_blk[:, :c], q_idx, k_idx[:c], q_seg,
                         seg_blk[:, :c])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, c), (0, 0), (0, 0)))  # noqa: E731
        return dq, pad(dk), pad(dv)

    def later(k_blk, v_blk, k_idx, seg_blk):  # only the local second chunk sees the block
        dq, dk, dv = upd(*map(hi, rows), k_blk, v_blk, q_idx[c:], k_idx, q_seg[:, c:],
                         seg_blk)
        return jnp.pad(dq, ((0, 0),) * 3 + ((c, 0), (0, 0))), dk, dv

    def step(carry, s):
        k_blk, v_blk, seg_blk, dk_blk, dv_blk, dq = carry
        src = (i - s) % n
        ddq, ddk, ddv = jax.lax.switch(_ring_case(i, src), (own, earlier, later), k_blk, v_blk,
                                       _local_index(n, c, src), seg_blk)
        dq, dk_blk, dv_blk = dq + ddq, dk_blk + ddk, dv_blk + ddv
        # Each block's gradient travels with it; after n hops both are home again.
        moved = tuple(jax.lax.ppermute(x, axes, ring)
                      for x in (k_blk, v_blk, seg_blk, dk_blk, dv_blk))
        return (*moved, dq), None

    init = (k, v, kv_seg, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
            jnp.zeros(q_bkgtd.shape, jnp.float32))
    (_, _, _, dk, dv, dq), _ = jax.lax.scan(step, init, jnp.arange(n))
    dq = jnp.moveaxis(dq, 3, 1).reshape(b, t, hq, d).astype(q.dtype)
    dsinks = None
    if sinks is not None:  # d lse / d sink = p_sink; d loss / d lse = -delta
        sink = sinks.astype(jnp.float32).reshape(1, hkv, g, 1)
        p_sink = jnp.exp(sink - lse)
        dsinks = (-jnp.sum(p_sink * delta, axis=(0, 3))).reshape(hq).astype(sinks.dtype)
    return (dq, dk.astype(k.dtype), dv.astype(v.dtype), dsinks, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_attention(q, k, v, sinks, q_seg, kv_seg, *, window, n, c, axes):
    return _ring(q, k, v, sinks, q_seg, kv_seg, window, n, c, axes, q.shape[-1] ** -0.5)


# ----------------------------------------------------------------------------- entry point


def context_attention(
    q_btnh: jax.Array,
    k_btkh: jax.Array,
    v_btkh: jax.Array,
    *,
    sinks: jax.Array | None,
    window: int | None,
    segment_ids: jax.Array | None,
    layout: SequenceLayout,
    batch_axes: tuple[str, ...],
    head_axes: tuple[str, ...],
    global_attention: str | None = None,
) -> jax.Array:
    """Causal attention of a zig-zag-ordered sequence split over the context axis.

    Same contract as `pallas_kernels.attention` with ``q_offset=0`` over the whole (natural)
    sequence: q/k/v [B, T, H, D] arrive (and the output leaves) in ``layout``'s order.
    Sliding-window layers exchange a halo; global layers all-gather K/V or run a ring
    (``global_attention``, default from `use_global_attention`).
    """
    name = global_attention or _GLOBAL.get()
    if name not in GLOBAL_IMPLEMENTATIONS:
        raise ValueError(f"unknown context-parallel global attention {name!r}; "
                         f"have {GLOBAL_IMPLEMENTATIONS}")
    b, t = q_btnh.shape[:2]
    if t != layout.t:
        raise ShardingError(f"context attention: sequence of {t} tokens, layout of {layout.t}")
    n, c, axes = layout.n, layout.chunk, layout.axes
    if window is not None and window >= t:
        window = None  # a window longer than the sequence is full causal attention
    if window is not None and window - 1 <= c:
        impl = _halo_attention
    elif name == "ring":
        impl = _ring_attention
    else:
        impl = _allgather_attention
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    bx, hx = batch_axes or None, head_axes or None
    qkv = PartitionSpec(bx, axes, hx, None)
    seg_spec = PartitionSpec(bx, axes)

    def local(q, k, v, s, sg):
        return impl(q, k, v, s, sg, sg, window=window, n=n, c=c, axes=axes)

    return jax.shard_map(
        local, mesh=layout.mesh,
        in_specs=(qkv, qkv, qkv, None if sinks is None else PartitionSpec(hx), seg_spec),
        out_specs=qkv, check_vma=False,
    )(q_btnh, k_btkh, v_btkh, sinks, seg)


# ----------------------------------------------------------------- inference (KV-cached attention)
#
# Chunked prefill and decoding (`mimo_jax.inference`) keep the sequence in the natural order:
# a prefill chunk of C tokens is split *contiguously* over the context axis (C/n tokens per
# shard, by the activations' "seq" constraint), and the cache of every global layer is split
# over its slots (slot = position, contiguous blocks of S/n slots per shard), so a 256K cache
# costs each device 1/n of it. Sliding-window layers keep their ring of W slots (128 in the
# release) whole on every context shard: it is small and every query needs all of it.
#
# * Global layer: every shard attends *all* queries of the step (the chunk's queries are
#   all-gathered; one decode token is whole already) to its own cache slots (and, in a split
#   chunk, its own slice of the chunk's keys) with a flash-decoding partial (output normalised
#   over those keys + log-sum-exp); the partials are merged across shards exactly (max of the
#   log-sum-exps, then a reduce-scatter of the weighted outputs back to each shard's queries,
#   or an all-reduce when the queries are whole), and the sinks join at the end. Traffic per
#   layer is O(queries), never O(cache): nothing gathers the cache.
# * Sliding layer with a split chunk: the chunk's keys/values are all-gathered (C rows) and
#   each shard runs the plain cached kernel for its queries over [ring; whole chunk].


def cached_context_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cache_pos: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    new_pos: jax.Array,
    *,
    q_offset: jax.Array,
    cache_length: jax.Array,
    sinks: jax.Array | None,
    window: int | None,
    mesh,
    batch_axes: tuple[str, ...],
    head_axes: tuple[str, ...],
    seq_axes: tuple[str, ...],
    slot_axes: tuple[str, ...],
) -> jax.Array:
    """`pallas_kernels.cached_attention` (same arguments, [B]-shaped ``q_offset`` and
    ``cache_length``) over the context axis: queries and the chunk's keys split over
    ``seq_axes`` (contiguously; () = whole on every shard), cache slots over ``slot_axes``
    (contiguous blocks; () = the whole cache on every shard). See the section comment."""
    if seq_axes and slot_axes and seq_axes != slot_axes:
        seq_axes = ()  # one axis set for both; the queries are then gathered by the in_specs
    bx, hx = batch_axes or None, head_axes or None
    tx, sx = seq_axes or None, slot_axes or None
    scale = q.shape[-1] ** -0.5
    rows = PartitionSpec(bx, tx, hx, None)
    cache_spec = PartitionSpec(bx, hx, sx, None)
    in_specs = (rows, cache_spec, cache_spec, PartitionSpec(bx, sx), rows, rows,
                PartitionSpec(bx, tx), PartitionSpec(bx), PartitionSpec(bx),
                None if sinks is None else PartitionSpec(hx))

    def local(q, kc, vc, cp, kn, vn, npos, qo, ln, sk):
        tl = q.shape[1]
        if seq_axes:
            i = jax.lax.axis_index(seq_axes)
            q_off_local = qo + i * tl
        if not slot_axes:  # the cache is whole here: this shard's queries over [cache; chunk]
            gather = lambda x: jax.lax.all_gather(x, seq_axes, axis=1, tiled=True)  # noqa: E731
            return pallas_kernels.cached_attention(
                q, kc, vc, cp, gather(kn), gather(vn), gather(npos), q_offset=q_off_local,
                cache_length=ln, sinks=sk, window=window)
        j = jax.lax.axis_index(slot_axes)
        s_local = kc.shape[2]
        ln_local = jnp.clip(ln - j * s_local, 0, s_local)
        q_all = jax.lax.all_gather(q, seq_axes, axis=1, tiled=True) if seq_axes else q
        parts = cache_partials(q_all, kc, vc, cp, q_offset=qo, cache_length=ln_local,
                               window=window, scale=scale)
        if seq_axes:  # this shard's slice of the chunk's keys joins its partial
            parts.append(decode_xla.new_part(q_all, kn, vn, npos, qo, window=window,
                                             scale=scale))
        o, lse = decode_xla.combine(parts)
        m = jax.lax.pmax(lse, slot_axes)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.exp(lse - m)
        num = o * w[..., None]
        if seq_axes:  # back to this shard's queries
            num = jax.lax.psum_scatter(num, seq_axes, scatter_dimension=1, tiled=True)
            den = jax.lax.psum_scatter(w, seq_axes, scatter_dimension=1, tiled=True)
            m = jax.lax.dynamic_slice_in_dim(m, i * tl, tl, axis=1)
        else:
            num, den = jax.lax.psum(num, slot_axes), jax.lax.psum(w, slot_axes)
        seen = den > 0
        merged = [(num / jnp.where(seen, den, 1.0)[..., None],
                   jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf))]
        if not seq_axes:  # the step's own keys, whole on every shard: counted once, here
            merged.append(decode_xla.new_part(q, kn, vn, npos, qo, window=window, scale=scale))
        return decode_xla.merge(merged, sk, q.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows,
                         check_vma=False)(q, k_cache, v_cache, cache_pos, k_new, v_new, new_pos,
                                          q_offset, cache_length, sinks)
