"""Cached forward passes: the main model and the MTP heads over a chunk of rows at explicit
per-row positions, attending to the cache plus the chunk itself.

Built from the model's own modules (`Attention.project_qkv` / `output`, norms, `mlp`); the
scanned blocks run under `jax.lax.scan` with their stacked caches as xs and their new keys and
values as ys, as `MiMo.backbone` does. The attention is a masked softmax over explicit key
positions, because ring-buffer slots are not in position order (so the kernel's "keys at
0..S-1" contract does not fit); it is exact, with the sinks in the denominator as in training.
Nothing is written here: callers commit the rows they keep (see kv_cache.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.inference.kv_cache import KVCache, LayerKV, full_slots, key_positions
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.mimo import DecoderLayer, MiMo, MTPHead, scan_plan
from mimo_jax.model.moe import MoE


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
    qpos_bt: jax.Array | None = None,
) -> jax.Array:
    """Queries (at `qpos_bt`, default `pos_bt`) over cached keys (positions `kpos_bs`, used
    only below `start_b`) and the chunk's own keys at `pos_bt` (causal, valid rows only);
    the window counts keys including the query."""
    b, t, hq, dqk = q_btnh.shape
    hkv = k_new_btkh.shape[2]
    g = hq // hkv
    scale = dqk**-0.5
    q_btkgd = q_btnh.reshape(b, t, hkv, g, dqk)
    qp = (pos_bt if qpos_bt is None else qpos_bt)[:, :, None]

    def mask(kp_bs, ok_bs):
        m = ok_bs[:, None, :] & (kp_bs[:, None, :] <= qp)
        if spec.window is not None:
            m &= kp_bs[:, None, :] > qp - spec.window
        return m  # [B, T, S]

    m_cache = mask(kpos_bs, (kpos_bs >= 0) & (kpos_bs < start_b[:, None]))
    m_new = mask(pos_bt, valid_bt)
    s_cache = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, kv.k.astype(q_btnh.dtype),
                         preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_new_btkh,
                       preferred_element_type=jnp.float32) * scale
    scores = jnp.concatenate([
        jnp.where(m_cache[:, None, None], s_cache, -jnp.inf),
        jnp.where(m_new[:, None, None], s_new, -jnp.inf),
    ], axis=-1)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if sinks_n is not None:
        sink = sinks_n.astype(jnp.float32).reshape(1, hkv, g, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks_n is not None:
        denom = denom + jnp.exp(sink - row_max)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    s = kv.k.shape[1]
    vdt = v_new_btkh.dtype
    o = jnp.einsum("bkgts,bskd->btkgd", p[..., :s].astype(vdt), kv.v.astype(vdt),
                   preferred_element_type=jnp.float32)
    o = o + jnp.einsum("bkgts,bskd->btkgd", p[..., s:].astype(vdt), v_new_btkh,
                       preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, -1).astype(q_btnh.dtype)


def layer_step(
    layer: DecoderLayer,
    h_btd: jax.Array,
    pos_bt: jax.Array,
    valid_bt: jax.Array,
    start_b: jax.Array,
    kv: LayerKV,
    kpos_bs: jax.Array,
) -> tuple[jax.Array, LayerKV]:
    """One decoder layer over the chunk; returns the new hidden and the chunk's keys/values."""
    attn = layer.attn
    q, k, v = attn.project_qkv(layer.input_norm(h_btd), pos_bt)
    sinks = None if attn.sinks is None else attn.sinks[...]
    o = cached_attention(q, k, v, kv, kpos_bs, pos_bt, valid_bt, start_b, attn.spec, sinks)
    h_btd = h_btd + attn.output(o)
    x_btd = layer.post_attn_norm(h_btd)
    if isinstance(layer.mlp, MoE):
        y_btd, _ = layer.mlp(x_btd, valid_bt)
    else:
        y_btd = layer.mlp(x_btd)
    return h_btd + y_btd, LayerKV(k, v)


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
    cfg = model.cfg
    plan = scan_plan(cfg)
    kpos = {}
    for kind in set(cfg.layer_types):
        spec = cfg.attention_spec(kind)
        if spec.window is None:
            kpos[kind] = key_positions(spec, cache, full_slots(cache, cfg))
        else:
            kpos[kind] = key_positions(spec, cache, cache.ring_pos.shape[1])

    h = model.embed_tokens(ids_bt)
    prefix_new = []
    for i, layer in enumerate(model.prefix_layers):
        h, new = layer_step(layer, h, pos_bt, valid_bt, start_b, cache.prefix[i],
                            kpos[cfg.layer_types[i]])
        prefix_new.append(new)
    blocks_new: tuple[LayerKV, ...] = ()
    if model.blocks is not None:
        graphdef, state = nnx.split(model.blocks)
        kinds = [cfg.layer_types[plan.num_prefix + j] for j in range(plan.period)]

        def body(h, xs):
            block_state, kvs = xs
            block = nnx.merge(graphdef, block_state)
            news = []
            for j, layer in enumerate(block.layers):
                h, new = layer_step(layer, h, pos_bt, valid_bt, start_b, kvs[j], kpos[kinds[j]])
                news.append(new)
            return h, tuple(news)

        h, blocks_new = jax.lax.scan(body, h, (state, cache.blocks))
    return h, model.final_norm(h), tuple(prefix_new), blocks_new


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
        z, new = layer_step(head.layer, z, pos_bt, valid_bt, start_b, kv, kpos)
        return head.final_norm(z), new
    layer = head.layer
    attn = layer.attn
    q, k, v = attn.project_qkv(layer.input_norm(z), pos_bt)
    sinks = None if attn.sinks is None else attn.sinks[...]
    o = cached_attention(q[:, -1:], k, v, kv, kpos, pos_bt, valid_bt, start_b, attn.spec, sinks,
                         qpos_bt=pos_bt[:, -1:])
    z1 = z[:, -1:] + attn.output(o)
    z1 = z1 + layer.mlp(layer.post_attn_norm(z1))
    return head.final_norm(z1), LayerKV(k, v)
