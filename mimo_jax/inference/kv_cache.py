"""KV caches by layer type.

- Global (full-attention) layers: the whole history, preallocated to `max_len` slots;
  slot = position.
- Sliding-window layers: a ring buffer of exactly `window` slots whatever the length; slot =
  position % window. Which position a slot holds is kept explicitly (`ring_pos`, -1 = empty),
  because chunked writes and speculative rollbacks leave slots out of position order.
- Every MTP head: its own sliding-window ring buffer (`mtp`, positions in `mtp_pos`).

On a mesh (`cache_axes`, placement.py): rows over the batch axes, KV heads over the head
axes, and a global layer's slots over the `context` axis (contiguous blocks of S/n slots, so
a 256K-token cache costs each context shard 1/n of it); ring buffers stay whole on every
context shard (W slots each). A global layer's write then lands in the shard that owns its
slot (`commit_main`), never gathering the cache.

Writes are deferred: a cached forward returns the new keys/values of its rows and `commit_*`
writes only the rows that were accepted, so rejected speculative rows never touch a ring buffer
(this is the rollback: nothing past the accepted prefix is ever written).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mimo_jax.model.config import AttentionSpec, ModelConfig
from mimo_jax.model.mimo import scan_plan
from mimo_jax.sharding.rules import ShardingRules, active


class LayerKV(NamedTuple):
    k: jax.Array  # [(blocks,) B, Hkv, S, Dqk] keys after RoPE (heads-major, as kernels read)
    v: jax.Array  # [(blocks,) B, Hkv, S, Dv] values after the value scale


class KVCache(NamedTuple):
    prefix: tuple[LayerKV, ...]  # one per unscanned main layer
    blocks: tuple[LayerKV, ...]  # one per position in the scanned block, leading [num_blocks]
    mtp: tuple[LayerKV, ...]  # one ring buffer per MTP head
    ring_pos: jax.Array  # [B, W] position held by each main sliding slot, -1 = empty
    mtp_pos: jax.Array  # [n_mtp, B, W] the same for each MTP head
    length: jax.Array  # [B] main positions 0..length-1 are cached


def usable_axes(mesh: Mesh, axes: tuple[str, ...], size: int, taken: tuple[str, ...] = ()
                ) -> tuple[str, ...]:
    """The mesh axes (of `axes`, not in `taken`) that split a dimension of `size` evenly;
    trailing ones are dropped until they do."""
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in taken)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def cache_axes(mesh: Mesh, rules: ShardingRules, batch: int, kv_heads: int, slots: int, *,
               global_layer: bool) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(batch axes, KV-head axes, slot axes) of a [B, Hkv, S, D] cache on a mesh. Only a
    global layer's cache (slot = position) splits its slots, over the sequence's (`context`)
    axes; a ring buffer stays whole."""
    bax = usable_axes(mesh, rules.mesh_axes("batch"), batch)
    hax = usable_axes(mesh, rules.mesh_axes("kv_heads"), kv_heads, taken=bax)
    sax = (usable_axes(mesh, rules.mesh_axes("seq"), slots, taken=bax + hax)
           if global_layer else ())
    return bax, hax, sax


def _slots(spec: AttentionSpec, max_len: int) -> int:
    return max_len if spec.window is None else min(spec.window, max_len)


def _layer_shape(cfg: ModelConfig, kind: str, batch: int, max_len: int):
    spec = cfg.attention_spec(kind)
    s = _slots(spec, max_len)
    kvh = spec.num_kv_heads
    return (batch, kvh, s, spec.head_dim), (batch, kvh, s, spec.v_head_dim)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, mtp_heads: int = 0) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions each, with ring buffers
    for the first `mtp_heads` MTP heads."""
    dt = jnp.dtype(cfg.dtype)
    plan = scan_plan(cfg)

    def layer(kind: str, lead: tuple[int, ...] = ()) -> LayerKV:
        ks, vs = _layer_shape(cfg, kind, batch, max_len)
        return LayerKV(jnp.zeros(lead + ks, dt), jnp.zeros(lead + vs, dt))

    prefix = tuple(layer(cfg.layer_types[i]) for i in range(plan.num_prefix))
    blocks = tuple(
        layer(cfg.layer_types[plan.num_prefix + j], (plan.num_blocks,)) for j in range(plan.period)
    )
    n_mtp = mtp_heads
    mtp = tuple(layer("sliding") for _ in range(n_mtp))
    w = _slots(cfg.sliding_attention, max_len) if cfg.sliding_attention.window else 1
    return KVCache(
        prefix=prefix,
        blocks=blocks,
        mtp=mtp,
        ring_pos=jnp.full((batch, w), -1, jnp.int32),
        mtp_pos=jnp.full((n_mtp, batch, w), -1, jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
    )


def key_positions(spec: AttentionSpec, cache: KVCache, n_slots: int, head: int | None = None):
    """[B, S] position of the key in each slot (-1 = empty) for a layer of this type."""
    if spec.window is None:
        idx = jnp.arange(n_slots, dtype=jnp.int32)[None, :]
        return jnp.where(idx < cache.length[:, None], idx, -1)
    return cache.ring_pos if head is None else cache.mtp_pos[head]


def slot_keep(spec: AttentionSpec, pos_bt: jax.Array, keep_bt: jax.Array, n_slots: int):
    """Slots [B, T] to write, n_slots (= dropped) where a row is not kept. In a ring, a chunk
    longer than the window keeps only its last `window` rows, so no two rows share a slot."""
    if spec.window is None:
        return jnp.where(keep_bt, pos_bt, n_slots)
    last_b = jnp.max(jnp.where(keep_bt, pos_bt, -1), axis=1, keepdims=True)
    keep_bt = keep_bt & (pos_bt > last_b - n_slots)
    return jnp.where(keep_bt, pos_bt % n_slots, n_slots)


def _write(buf_bksd: jax.Array, new_btkd: jax.Array, slots_bt: jax.Array) -> jax.Array:
    b_bt = jnp.broadcast_to(jnp.arange(buf_bksd.shape[0])[:, None], slots_bt.shape)
    # Advanced indices around a slice: the indexed view is [B, T, Hkv, D], like new_btkd.
    return buf_bksd.at[b_bt, :, slots_bt].set(new_btkd.astype(buf_bksd.dtype), mode="drop")


def write_layer(kv: LayerKV, new: LayerKV, slots_bt: jax.Array) -> LayerKV:
    """Write rows into one layer's cache; `kv`/`new` may carry a leading [num_blocks] axis."""
    if kv.k.ndim == 5:
        return jax.vmap(write_layer, in_axes=(0, 0, None))(kv, new, slots_bt)
    return LayerKV(_write(kv.k, new.k, slots_bt), _write(kv.v, new.v, slots_bt))


def write_global_layer(kv: LayerKV, new: LayerKV, slots_bt: jax.Array) -> LayerKV:
    """`write_layer` for a global layer: under a mesh whose `context` axis splits the cache's
    slots (`cache_axes`), each shard writes the rows whose slot it owns (the new rows, a
    chunk's worth, are gathered; the cache never is)."""
    ctx = active()
    if ctx is None:
        return write_layer(kv, new, slots_bt)
    mesh, rules = ctx
    lead = kv.k.ndim - 4
    b, hkv, s = kv.k.shape[lead:lead + 3]
    bax, hax, sax = cache_axes(mesh, rules, b, hkv, s, global_layer=True)
    if not sax:
        return write_layer(kv, new, slots_bt)
    bx, hx = bax or None, hax or None
    cache_spec = P(*(None,) * lead, bx, hx, sax, None)
    new_spec = P(*(None,) * lead, bx, None, hx, None)

    def local(k, v, nk, nv, slots):
        s_local = k.shape[lead + 2]
        loc = slots - jax.lax.axis_index(sax) * s_local
        loc = jnp.where((loc >= 0) & (loc < s_local), loc, s_local)  # s_local: dropped
        return write_layer(LayerKV(k, v), LayerKV(nk, nv), loc)

    out = jax.shard_map(local, mesh=mesh,
                        in_specs=(cache_spec, cache_spec, new_spec, new_spec, P(bx, None)),
                        out_specs=LayerKV(cache_spec, cache_spec), check_vma=False)(
        kv.k, kv.v, new.k, new.v, slots_bt)
    return LayerKV(*out)


def write_pos(pos_bs: jax.Array, pos_bt: jax.Array, slots_bt: jax.Array) -> jax.Array:
    b_bt = jnp.broadcast_to(jnp.arange(pos_bs.shape[0])[:, None], slots_bt.shape)
    return pos_bs.at[b_bt, slots_bt].set(pos_bt, mode="drop")


def commit_main(
    cfg: ModelConfig, cache: KVCache, prefix_new, blocks_new, pos_bt: jax.Array, keep_bt: jax.Array
) -> KVCache:
    """Write the kept rows of a main forward. Kept rows must extend the cached prefix
    contiguously (positions length..length+m-1), as prefill and accepted tokens do."""
    plan = scan_plan(cfg)
    slots = {}
    for kind in ("full", "sliding"):
        spec = cfg.attention_spec(kind)
        n = cache.ring_pos.shape[1] if spec.window is not None else full_slots(cache, cfg)
        slots[kind] = slot_keep(spec, pos_bt, keep_bt, n) if n else None

    def write(kind, kv, new):
        if cfg.attention_spec(kind).window is None:
            return write_global_layer(kv, new, slots[kind])
        return write_layer(kv, new, slots[kind])

    prefix = tuple(
        write(cfg.layer_types[i], kv, new)
        for i, (kv, new) in enumerate(zip(cache.prefix, prefix_new, strict=True))
    )
    blocks = tuple(
        write(cfg.layer_types[plan.num_prefix + j], kv, new)
        for j, (kv, new) in enumerate(zip(cache.blocks, blocks_new, strict=True))
    )
    ring_pos = cache.ring_pos
    if "sliding" in cfg.layer_types:
        ring_pos = write_pos(ring_pos, pos_bt, slots["sliding"])
    last_b = jnp.max(jnp.where(keep_bt, pos_bt + 1, 0), axis=1)
    return cache._replace(prefix=prefix, blocks=blocks, ring_pos=ring_pos,
                          length=jnp.maximum(cache.length, last_b))


def commit_mtp(
    cfg: ModelConfig, cache: KVCache, head: int, new: LayerKV, pos_bt: jax.Array, keep_bt: jax.Array
) -> KVCache:
    n = cache.mtp_pos.shape[2]
    slots = slot_keep(cfg.sliding_attention, pos_bt, keep_bt, n)
    mtp = list(cache.mtp)
    mtp[head] = write_layer(mtp[head], new, slots)
    mtp_pos = cache.mtp_pos.at[head].set(write_pos(cache.mtp_pos[head], pos_bt, slots))
    return cache._replace(mtp=tuple(mtp), mtp_pos=mtp_pos)


def full_slots(cache: KVCache, cfg: ModelConfig) -> int:
    plan = scan_plan(cfg)
    for i in range(plan.num_prefix):
        if cfg.layer_types[i] == "full":
            return cache.prefix[i].k.shape[2]
    for j in range(plan.period):
        if cfg.layer_types[plan.num_prefix + j] == "full":
            return cache.blocks[j].k.shape[3]
    return 0


def cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, *, all_global: bool = False,
                with_mtp: bool = True) -> dict[str, int]:
    """KV-cache bytes from shapes alone (nothing allocated): per layer type and in total.
    `all_global=True` prices the same model with every layer (and head) keeping full history."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    out = {"full": 0, "sliding": 0, "mtp": 0}
    for kind in cfg.layer_types:
        spec = cfg.attention_spec(kind)
        s = seq_len if all_global else _slots(spec, seq_len)
        out[kind] += batch * s * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * itemsize
    if with_mtp:
        spec = cfg.sliding_attention
        s = seq_len if all_global else _slots(spec, seq_len)
        per = batch * s * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * itemsize
        out["mtp"] = per * cfg.num_mtp_layers
    out["total"] = int(np.sum(list(out.values())))
    return out


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (e.g. a KVCache)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
