"""Cached forward passes: the main model and the MTP heads over a chunk of rows at explicit
per-row positions, attending to the cache plus the chunk itself.

Built from the model's own modules (`Attention.project_qkv` / `output`, norms, `mlp`); the
scanned blocks run under `jax.lax.scan` with their stacked caches as xs and their new keys and
values as ys, as `MiMo.backbone` does. Attention goes through the kernels' dispatch point
`pallas_kernels.cached_attention` (explicit key positions, since ring-buffer slots are not in
position order; sinks in the denominator as in training). Under an active mesh
(`mimo_jax.sharding.activate`) it runs per shard: batch rows over the batch axes, KV heads
(with their query heads) over the head axes, exactly where the projections put them.
Nothing is written here: callers commit the rows they keep (see kv_cache.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from mimo_jax.inference.kv_cache import (
    KVCache,
    LayerKV,
    cache_axes,
    full_slots,
    key_positions,
    usable_axes,
)
from mimo_jax.model import context_parallel
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.mimo import DecoderLayer, MiMo, MTPHead, scan_plan
from mimo_jax.model.moe import MoE
from mimo_jax.sharding.rules import active, constrain


def cached_attention(
    q_btnh: jax.Array,
    k_new_btkh: jax.Array,
    v_new_btkh: jax.Array,
    kv: LayerKV,
    kpos_bs: jax.Array,
    pos_bt: jax.Array,
    valid_bt: jax.Array,
    start_b: jax.Array,
    spec: AttentionSpec,
    sinks_n: jax.Array | None,
    q_offset_b: jax.Array | None = None,
) -> jax.Array:
    """Queries (at q_offset_b + 0..T-1, default pos_bt[:, 0] + ...) over the cached keys
    (positions `kpos_bs`, used only below `start_b`: later slots are stale or provisional)
    and the chunk's own keys at `pos_bt` (valid rows only)."""
    cache_pos = jnp.where(kpos_bs < start_b[:, None], kpos_bs, -1)
    new_pos = jnp.where(valid_bt, pos_bt, -1)
    q_offset = pos_bt[:, 0] if q_offset_b is None else q_offset_b
    # A global cache holds position p in slot p: nothing at or past start is read.
    length = start_b if spec.window is None else jnp.full_like(start_b, kv.k.shape[2])
    sinks = None if sinks_n is None else sinks_n.astype(jnp.float32)
    fn = functools.partial(pallas_kernels.cached_attention, window=spec.window)
    args = (q_btnh, kv.k, kv.v, cache_pos, k_new_btkh, v_new_btkh, new_pos, q_offset, length)
    ctx = active()
    if ctx is not None:
        mesh, rules = ctx
        b, t, hkv = q_btnh.shape[0], q_btnh.shape[1], kv.k.shape[1]
        bax, hax, sax = cache_axes(mesh, rules, b, hkv, kv.k.shape[2],
                                   global_layer=spec.window is None)
        # A chunk (not one token) splits over the context axis like the activations do.
        tax = ()
        if t == k_new_btkh.shape[1]:
            tax = usable_axes(mesh, rules.mesh_axes("seq"), t, taken=bax + hax)
        if tax or sax:
            return context_parallel.cached_context_attention(
                *args[:7], q_offset=jnp.broadcast_to(q_offset, (b,)),
                cache_length=jnp.broadcast_to(length, (b,)), sinks=sinks, window=spec.window,
                mesh=mesh, batch_axes=bax, head_axes=hax, seq_axes=tax, slot_axes=sax)
        if bax or hax:
            bs, hs = bax or None, hax or None
            specs = (P(bs, None, hs, None), P(bs, hs, None, None), P(bs, hs, None, None),
                     P(bs, None), P(bs, None, hs, None), P(bs, None, hs, None), P(bs, None),
                     P(bs), P(bs))

            def local(q, kc, vc, cp, kn, vn, npos, qo, ln, sk):
                return fn(q, kc, vc, cp, kn, vn, npos, q_offset=qo, cache_length=ln, sinks=sk)

            return jax.shard_map(
                local, mesh=mesh, in_specs=(*specs, None if sinks is None else P(hs)),
                out_specs=P(bs, None, hs, None), check_vma=False,
            )(*args, sinks)
    return fn(*args[:7], q_offset=q_offset, cache_length=length, sinks=sinks)


def layer_step(
    layer: DecoderLayer,
    h_btd: jax.Array,
    pos_bt: jax.Array,
    valid_bt: jax.Array,
    start_b: jax.Array,
    kv: LayerKV,
    kpos_bs: jax.Array,
) -> tuple[jax.Array, LayerKV, jax.Array | None]:
    """One decoder layer over the chunk; returns the new hidden, the chunk's keys/values and
    the MoE's routed expert ids [B, T, K] (None for a dense layer; unused outputs cost nothing
    under jit)."""
    attn = layer.attn
    q, k, v = attn.project_qkv(layer.input_norm(h_btd), pos_bt)
    sinks = None if attn.sinks is None else attn.sinks[...]
    o = cached_attention(q, k, v, kv, kpos_bs, pos_bt, valid_bt, start_b, attn.spec, sinks)
    h_btd = h_btd + attn.output(o)
    x_btd = layer.post_attn_norm(h_btd)
    ids = None
    if isinstance(layer.mlp, MoE):
        y_btd, router = layer.mlp(x_btd, valid_bt)
        ids = router.expert_ids
    else:
        y_btd = layer.mlp(x_btd)
    return constrain(h_btd + y_btd, ("batch", "seq", "act_embed")), LayerKV(k, v), ids


def main_forward(
    model: MiMo,
    cache: KVCache,
    ids_bt: jax.Array,
    pos_bt: jax.Array,
    valid_bt: jax.Array,
    start_b: jax.Array,
) -> tuple[jax.Array, jax.Array, tuple[LayerKV, ...], tuple[LayerKV, ...]]:
    """Main model over a chunk. Returns (hidden before the final norm, after it, the prefix
    layers' new KV, the blocks' new KV stacked [num_blocks, ...])."""
    return routed_main_forward(model, cache, ids_bt, pos_bt, valid_bt, start_b)[:4]


def routed_main_forward(
    model: MiMo,
    cache: KVCache,
    ids_bt: jax.Array,
    pos_bt: jax.Array,
    valid_bt: jax.Array,
    start_b: jax.Array,
) -> tuple[jax.Array, jax.Array, tuple[LayerKV, ...], tuple[LayerKV, ...], jax.Array | None]:
    """`main_forward`, plus the routed expert ids of every MoE layer in layer order
    [L_moe, B, T, K] (None without MoE layers), for rollout routing replay."""
    cfg = model.cfg
    plan = scan_plan(cfg)
    kpos = {}
    for kind in set(cfg.layer_types):
        spec = cfg.attention_spec(kind)
        if spec.window is None:
            kpos[kind] = key_positions(spec, cache, full_slots(cache, cfg))
        else:
            kpos[kind] = key_positions(spec, cache, cache.ring_pos.shape[1])

    # A chunk splits over the context axis (contiguously) when its length allows.
    h = constrain(model.embed_tokens(ids_bt), ("batch", "seq", "act_embed"))
    prefix_new, routes = [], []
    for i, layer in enumerate(model.prefix_layers):
        h, new, ids = layer_step(layer, h, pos_bt, valid_bt, start_b, cache.prefix[i],
                                 kpos[cfg.layer_types[i]])
        prefix_new.append(new)
        if ids is not None:
            routes.append(ids)
    routes_arr = jnp.stack(routes) if routes else None
    blocks_new: tuple[LayerKV, ...] = ()
    if model.blocks is not None:
        graphdef, state = nnx.split(model.blocks)
        kinds = [cfg.layer_types[plan.num_prefix + j] for j in range(plan.period)]

        def body(h, xs):
            block_state, kvs = xs
            block = nnx.merge(graphdef, block_state)
            news, block_routes = [], []
            for j, layer in enumerate(block.layers):
                h, new, ids = layer_step(layer, h, pos_bt, valid_bt, start_b, kvs[j],
                                         kpos[kinds[j]])
                news.append(new)
                if ids is not None:
                    block_routes.append(ids)
            return h, (tuple(news), jnp.stack(block_routes) if block_routes else None)

        h, (blocks_new, block_ids) = jax.lax.scan(body, h, (state, cache.blocks))
        if block_ids is not None:  # [n_blocks, moe_per_block, ...] -> layer order
            block_ids = block_ids.reshape(-1, *block_ids.shape[2:])
            routes_arr = block_ids if routes_arr is None else jnp.concatenate(
                [routes_arr, block_ids])
    return h, model.final_norm(h), tuple(prefix_new), blocks_new, routes_arr


def mtp_forward(
    model: MiMo,
    head_index: int,
    cache: KVCache,
    h_btd: jax.Array,
    ids_bt: jax.Array,
    pos_bt: jax.Array,
    valid_bt: jax.Array,
    start_b: jax.Array,
    last_only: bool = False,
) -> tuple[jax.Array, LayerKV]:
    """MTP head `head_index` over rows (main hidden h[t], token t+k+1) at positions t; returns
    its normed output [B, T, D] (only the last row's, [B, 1, D], with `last_only`) and the
    rows' keys/values. A head is one layer, so a row's keys/values depend on that row alone:
    drafting needs the attention and MLP of the last row only."""
    head: MTPHead = model.mtp[head_index]
    emb = model.embed_tokens(ids_bt)
    x = jnp.concatenate([head.embed_norm(emb), head.hidden_norm(h_btd.astype(emb.dtype))], -1)
    z = jnp.einsum("btc,cd->btd", x, head.eh_proj[...].astype(x.dtype))
    kv, kpos = cache.mtp[head_index], cache.mtp_pos[head_index]
    if not last_only:
        z, new, _ = layer_step(head.layer, z, pos_bt, valid_bt, start_b, kv, kpos)
        return head.final_norm(z), new
    layer = head.layer
    attn = layer.attn
    q, k, v = attn.project_qkv(layer.input_norm(z), pos_bt)
    sinks = None if attn.sinks is None else attn.sinks[...]
    o = cached_attention(q[:, -1:], k, v, kv, kpos, pos_bt, valid_bt, start_b, attn.spec, sinks,
                         q_offset_b=pos_bt[:, -1])
    z1 = z[:, -1:] + attn.output(o)
    z1 = z1 + layer.mlp(layer.post_attn_norm(z1))
    return head.final_norm(z1), LayerKV(k, v)
