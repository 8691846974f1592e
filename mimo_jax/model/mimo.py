"""MiMo-V2-Flash in Flax NNX: decoder layers, the scanned layer stack, MTP heads, the LM.

Layers whose (attention type, mlp type) pattern repeats are stacked into blocks and run with
`jax.lax.scan`, so compile time does not grow with depth. In the release, layers 6..47 are
7 repeats of [5 sliding + 1 full]; layers 0..5 stay unscanned (the "prefix").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.model import context_parallel
from mimo_jax.model.attention import Attention
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.layers import DenseMLP, RMSNorm, linear, param
from mimo_jax.model.moe import MoE, RouterOutput
from mimo_jax.sharding.rules import constrain


class ScanPlan(NamedTuple):
    num_prefix: int  # leading layers run one by one
    period: int  # layers per scanned block (0 = nothing scanned)
    num_blocks: int


def scan_plan(cfg: ModelConfig) -> ScanPlan:
    """The longest suffix of layers that is >= 2 repeats of one block (shortest block wins ties)."""
    kinds, n = cfg.layer_kinds, cfg.num_layers
    best = ScanPlan(n, 0, 0)
    for start in range(n):
        for period in range(1, (n - start) // 2 + 1):
            if (n - start) % period:
                continue
            if all(kinds[i] == kinds[i - period] for i in range(start + period, n)):
                return ScanPlan(start, period, (n - start) // period)
    return best


def layer_location(cfg: ModelConfig, layer: int) -> tuple[str, int, int | None]:
    """Where main layer `layer` lives: ("prefix", index, None) or ("blocks", position, block)."""
    plan = scan_plan(cfg)
    if layer < plan.num_prefix:
        return "prefix", layer, None
    offset = layer - plan.num_prefix
    return "blocks", offset % plan.period, offset // plan.period


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then a dense MLP or an MoE."""

    def __init__(self, cfg: ModelConfig, attention_type: str, mlp_type: str, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        d, std = cfg.hidden_size, cfg.initializer_range
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg.attention_spec(attention_type), d, cfg.value_scale,
                              std=std, param_dtype=pdt, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        if mlp_type == "moe":
            self.mlp = MoE(cfg, param_dtype=pdt, rngs=rngs)
        else:
            self.mlp = DenseMLP(d, cfg.intermediate_size, std=std, param_dtype=pdt, rngs=rngs)

    def __call__(
        self,
        h_btd: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array | None,
        expert_ids_btk: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterOutput | None]:
        h_btd = h_btd + self.attn(self.input_norm(h_btd), positions_bt, segment_ids_bt)
        x_btd = self.post_attn_norm(h_btd)
        router = None
        if isinstance(self.mlp, MoE):
            valid_bt = None if segment_ids_bt is None else segment_ids_bt != 0
            y_btd, router = self.mlp(x_btd, valid_bt, expert_ids_btk)
        else:
            y_btd = self.mlp(x_btd)
        return constrain(h_btd + y_btd, ("batch", "seq", "act_embed")), router


class LayerBlock(nnx.Module):
    """One repeat of the scanned pattern (for the release: 5 sliding layers + 1 full layer)."""

    def __init__(self, cfg: ModelConfig, kinds: tuple[tuple[str, str], ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, a, m, rngs=rngs) for a, m in kinds])

    def __call__(self, h_btd, positions_bt, segment_ids_bt, expert_ids_mbtk=None):
        routers = []
        for layer in self.layers:
            ids = None
            if expert_ids_mbtk is not None and isinstance(layer.mlp, MoE):
                ids = expert_ids_mbtk[len(routers)]
            h_btd, router = layer(h_btd, positions_bt, segment_ids_bt, ids)
            if router is not None:
                routers.append(router)
        return h_btd, _stack(routers)


class MTPHead(nnx.Module):
    """One multi-token-prediction head (checkpoint.md §3M): [enorm(emb), hnorm(h)] -> eh_proj ->
    one sliding-window layer with a dense MLP -> final norm; embedding and LM head are shared."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, d = jnp.dtype(cfg.param_dtype), cfg.hidden_size
        self.embed_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        # Rows 0..D-1 read the embedding, rows D..2D-1 the hidden state (the release's order).
        self.eh_proj = param(rngs, (2 * d, d), ("embed_concat", "embed"), pdt,
                             std=cfg.initializer_range)
        self.layer = DecoderLayer(cfg, "sliding", "dense", rngs=rngs)
        self.final_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)

    def __call__(self, emb_btd, h_btd, positions_bt, segment_ids_bt) -> jax.Array:
        x_btd = jnp.concatenate([self.embed_norm(emb_btd), self.hidden_norm(h_btd)], axis=-1)
        z_btd = linear(x_btd, self.eh_proj[...])
        z_btd, _ = self.layer(z_btd, positions_bt, segment_ids_bt)
        return self.final_norm(z_btd)


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V]
    mtp_logits: jax.Array | None  # [n_mtp, B, T, V]; head k at t predicts token t+k+2
    hidden: jax.Array | None = None  # [B, T, D] main hidden after the final norm
    mtp_hidden: jax.Array | None = None  # [n_mtp, B, T, D] after each head's final norm
    router: RouterOutput | None = None  # fields stacked over MoE layers in layer order


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class MiMo(nnx.Module):
    """The causal LM with its MTP heads. `MiMo(cfg, rngs=nnx.Rngs(0))` initialises randomly;
    `mimo_jax.load(path)` reads released weights."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; have {sorted(REMAT_POLICIES)}")
        pdt, d = jnp.dtype(cfg.param_dtype), cfg.hidden_size
        std = cfg.initializer_range
        self.cfg = cfg
        self.remat = remat
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), pdt, std=std)
        plan = scan_plan(cfg)
        kinds = cfg.layer_kinds
        self.prefix_layers = nnx.List(
            [DecoderLayer(cfg, a, m, rngs=rngs) for a, m in kinds[: plan.num_prefix]]
        )
        blocks = None
        if plan.num_blocks:
            block_kinds = kinds[plan.num_prefix : plan.num_prefix + plan.period]

            @nnx.split_rngs(splits=plan.num_blocks)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs: nnx.Rngs) -> LayerBlock:
                return LayerBlock(cfg, block_kinds, rngs=rngs)

            blocks = make_blocks(rngs)
            for _, var in nnx.iter_graph(blocks):
                if isinstance(var, nnx.Variable):
                    var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
        self.blocks = nnx.data(blocks)
        self.final_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), pdt, std=std)
        )
        self.mtp = nnx.List([MTPHead(cfg, rngs=rngs) for _ in range(cfg.num_mtp_layers)])

    # ------------------------------------------------------------------ pieces
    def embed_tokens(self, ids_bt: jax.Array) -> jax.Array:
        h_btd = jnp.take(self.embed[...], ids_bt, axis=0).astype(self.cfg.dtype)
        return constrain(h_btd, ("batch", "seq", "act_embed"))

    def lm_logits(self, h_btd: jax.Array) -> jax.Array:
        w_dv = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = linear(h_btd, w_dv)
        return constrain(logits, (None,) * (logits.ndim - 3) + ("batch", "seq", "act_vocab"))

    def backbone(
        self,
        ids_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array | None,
        expert_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterOutput | None]:
        """Main stack up to (not including) the final norm. `expert_ids` [L_moe, B, T, K]."""
        h_btd = self.embed_tokens(ids_bt)
        routers: list[RouterOutput] = []
        moe_seen = 0
        for layer in self.prefix_layers:
            ids = None
            if expert_ids is not None and isinstance(layer.mlp, MoE):
                ids = expert_ids[moe_seen]
            h_btd, router = layer(h_btd, positions_bt, segment_ids_bt, ids)
            if router is not None:
                routers.append(router)
                moe_seen += 1
        if self.blocks is None:
            return h_btd, _stack(routers)

        plan = scan_plan(self.cfg)
        block_replay = None
        if expert_ids is not None:
            rest = expert_ids[moe_seen:]
            block_replay = rest.reshape(plan.num_blocks, -1, *rest.shape[1:])
        graphdef, block_state = nnx.split(self.blocks)

        def body(h, xs):
            state, replay = xs
            return nnx.merge(graphdef, state)(h, positions_bt, segment_ids_bt, replay)

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        h_btd, block_routers = jax.lax.scan(body, h_btd, (block_state, block_replay))
        if block_routers is not None:  # [n_blocks, moe_per_block, ...] -> layer order
            block_routers = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), block_routers)
            routers.append(block_routers)
            return h_btd, _concat(routers)
        return h_btd, _stack(routers)

    def mtp_hidden_states(
        self,
        h_btd: jax.Array,
        ids_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array | None,
        layout: context_parallel.SequenceLayout | None = None,
    ) -> jax.Array:
        """[n_mtp, B, T, D]: head k at position t sees (h[t], token t+k+1). With a context
        `layout`, `ids_bt` is in the natural order and everything else in the layout's."""
        t = ids_bt.shape[1]
        outs = []
        for k, head in enumerate(self.mtp):
            shift = min(k + 1, t)
            next_ids_bt = jnp.pad(ids_bt[:, shift:], ((0, 0), (0, shift)))
            if layout is not None:
                next_ids_bt = layout.to_shards(next_ids_bt)
            outs.append(head(self.embed_tokens(next_ids_bt), h_btd, positions_bt, segment_ids_bt))
        return jnp.stack(outs)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        expert_ids: jax.Array | None = None,
        compute_mtp: bool = True,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Forward over token ids [B, T].

        Args:
          positions: [B, T] RoPE positions; default: 0.. per row, restarting at each document
            when `segment_ids` are given.
          segment_ids: [B, T] positive document ids for packed rows (0 = padding); attention
            never crosses documents.
          expert_ids: [L_moe, B, T, K] routing to replay instead of choosing experts.
          compute_mtp: run the MTP heads (when the model has any).
          compute_logits: False returns hidden states only (for chunked losses).
        """
        ids_bt = _check_ids(input_ids, self.cfg.vocab_size)
        if positions is None:
            positions = default_positions(ids_bt.shape, segment_ids)
        # A sequence split over the `context` mesh axis runs in the zig-zag order (balanced
        # causal attention); the outputs go back to the natural order (context_parallel.py).
        layout = context_parallel.sequence_layout(ids_bt.shape[1])
        enter = (lambda x, *_: x) if layout is None else layout.to_shards  # noqa: E731
        opt = lambda x, *a: None if x is None else enter(x, *a)  # noqa: E731
        with context_parallel.entered(layout):
            h_btd, router = self.backbone(enter(ids_bt), enter(positions), opt(segment_ids),
                                          opt(expert_ids, (None, "batch", "seq", None)))
            h_norm_btd = self.final_norm(h_btd)
            mtp_hidden = None
            if compute_mtp and len(self.mtp):
                feed = h_norm_btd if self.cfg.mtp_hidden == "post_norm" else h_btd
                mtp_hidden = self.mtp_hidden_states(feed, ids_bt, enter(positions),
                                                    opt(segment_ids), layout)
        if layout is not None:
            h_norm_btd, mtp_hidden, router = layout.outputs_to_natural(
                h_norm_btd, mtp_hidden, router)
        if not compute_logits:
            return ModelOutput(None, None, h_norm_btd, mtp_hidden, router)
        return ModelOutput(
            logits=self.lm_logits(h_norm_btd),
            mtp_logits=None if mtp_hidden is None else self.lm_logits(mtp_hidden),
            hidden=h_norm_btd,
            mtp_hidden=mtp_hidden,
            router=router,
        )


def default_positions(shape: tuple[int, int], segment_ids: jax.Array | None) -> jax.Array:
    """0..T-1 per row, or restarting at every document boundary of `segment_ids`."""
    b, t = shape
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        return idx_bt
    starts_bt = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx_bt = jax.lax.cummax(jnp.where(starts_bt, idx_bt, 0), axis=1)
    return idx_bt - start_idx_bt


def _check_ids(input_ids: jax.Array, vocab_size: int) -> jax.Array:
    ids = jnp.asarray(input_ids) if not isinstance(input_ids, jax.Array) else input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        lo, hi = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}); got min {lo}, max {hi}")
    return ids.astype(jnp.int32)


def _stack(routers: list[RouterOutput]) -> RouterOutput | None:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *routers) if routers else None


def _concat(parts: list[RouterOutput]) -> RouterOutput:
    """Join per-layer router outputs: single layers (unstacked) and already-stacked groups."""
    stacked = [p for p in parts if p.expert_ids.ndim == 4]
    singles = [p for p in parts if p.expert_ids.ndim == 3]
    groups = ([_stack(singles)] if singles else []) + stacked
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups)
