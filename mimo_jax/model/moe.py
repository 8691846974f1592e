"""Sigmoid-routed mixture of experts (DeepSeek-V3 "noaux_tc" routing, no shared expert)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.expert_parallel import moe_experts
from mimo_jax.model.fp8_linear import FP8Weight, gathered_experts_apply
from mimo_jax.model.layers import RouterBias, param
from mimo_jax.sharding.rules import active


class RouterOutput(NamedTuple):
    """What one MoE layer reports about its routing (for training, balancing and replay)."""

    expert_ids: jax.Array  # [B, T, K] int32: the experts used (replayable)
    expert_weights: jax.Array  # [B, T, K] float32: combine weights
    expert_load: jax.Array  # [E] float32: assignments per expert over valid tokens
    balance_loss: jax.Array  # [] float32: sequence-level balance loss, before its coefficient
    dropped: jax.Array  # [] int32: assignments dropped by a capacity limit (0 when dropless)


def select_experts(scores_te: jax.Array, bias_e: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """Top-k expert ids [T, K] from sigmoid scores, the bias steering selection only.

    With n_group > 1, only experts in the `topk_group` groups with the best top-2 sums compete.
    """
    choice_te = scores_te if bias_e is None else scores_te + bias_e
    if cfg.n_group > 1:
        t, e = choice_te.shape
        grouped_tgx = choice_te.reshape(t, cfg.n_group, e // cfg.n_group)
        group_scores_tg = jnp.sum(jax.lax.top_k(grouped_tgx, 2)[0], axis=-1)
        _, top_groups = jax.lax.top_k(group_scores_tg, cfg.topk_group)
        group_ok_tg = jnp.any(top_groups[:, :, None] == jnp.arange(cfg.n_group), axis=1)
        group_ok_te = jnp.repeat(group_ok_tg, e // cfg.n_group, axis=1)
        choice_te = jnp.where(group_ok_te, choice_te, -jnp.inf)
    return jax.lax.top_k(choice_te, cfg.num_experts_per_tok)[1].astype(jnp.int32)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        std = cfg.initializer_range
        self.cfg = cfg
        # The router stays float32 whatever the parameter dtype (as in the release).
        self.router = param(rngs, (d, e), ("embed", "experts"), jnp.float32, std=std)
        self.correction_bias = (
            RouterBias(jnp.zeros((e,), jnp.float32), axes=("experts",))
            if cfg.router_correction_bias
            else None
        )
        # Gate and up fused on a trailing axis of 2 so that sharding "expert_mlp" keeps each
        # device's gate and up columns together; [E, D, F, 2] reshapes freely to [E, D, 2F].
        self.gate_up = param(rngs, (e, d, f, 2), ("experts", "embed", "expert_mlp", None),
                             param_dtype, std=std)
        self.down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), param_dtype, std=std)

    def __call__(
        self,
        x_btd: jax.Array,
        valid_bt: jax.Array | None = None,
        expert_ids_btk: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterOutput]:
        """Route and run the experts. `expert_ids_btk` replays a recorded routing decision."""
        cfg = self.cfg
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        logits_te = jnp.matmul(
            x_td.astype(jnp.float32), self.router[...], precision=jax.lax.Precision.HIGHEST
        )
        scores_te = jax.nn.sigmoid(logits_te)
        bias = None if self.correction_bias is None else self.correction_bias[...]
        if expert_ids_btk is None:
            ids_tk = select_experts(scores_te, bias, cfg)
        else:
            ids_tk = expert_ids_btk.reshape(b * t, -1).astype(jnp.int32)
        weights_tk = jnp.take_along_axis(scores_te, ids_tk, axis=1)
        if cfg.norm_topk_prob:
            weights_tk = weights_tk / (jnp.sum(weights_tk, axis=-1, keepdims=True) + 1e-20)
        weights_tk = weights_tk * cfg.routed_scaling_factor

        # FP8 experts while decoding a few tokens: dequantise only the experts used.
        y_td = None
        if isinstance(self.gate_up, FP8Weight) and active() is None:
            y_td = gathered_experts_apply(self.gate_up, self.down, x_td, ids_tk, weights_tk)
        if y_td is None:
            y_td, dropped = moe_experts(
                x_td, ids_tk, weights_tk, self.gate_up[...].astype(x_btd.dtype),
                self.down[...].astype(x_btd.dtype), num_experts=cfg.num_experts,
                capacity_factor=cfg.moe_capacity_factor,
            )
        else:
            dropped = jnp.zeros((), jnp.int32)

        valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt
        onehot_btke = jax.nn.one_hot(ids_tk.reshape(b, t, -1), cfg.num_experts, dtype=jnp.float32)
        onehot_btke = onehot_btke * valid_bt[:, :, None, None]
        load_e = jnp.sum(onehot_btke, axis=(0, 1, 2))
        stats = RouterOutput(
            expert_ids=ids_tk.reshape(b, t, -1),
            expert_weights=weights_tk.reshape(b, t, -1),
            expert_load=load_e,
            balance_loss=_sequence_balance_loss(
                scores_te.reshape(b, t, -1), onehot_btke, valid_bt, cfg.num_experts_per_tok
            ),
            dropped=jnp.asarray(dropped, jnp.int32),
        )
        return y_td.reshape(b, t, d), stats


def _sequence_balance_loss(
    scores_bte: jax.Array, onehot_btke: jax.Array, valid_bt: jax.Array, k: int
) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_e f_e * P_e, averaged over sequences.

    f_e = E / (K T) * (tokens of the sequence sent to e); P_e = mean over its tokens of the
    normalised score s_e / sum(s). Padding (invalid) tokens count for neither.
    """
    e = scores_bte.shape[-1]
    n_tokens_b = jnp.maximum(jnp.sum(valid_bt, axis=1), 1).astype(jnp.float32)
    f_be = jnp.sum(onehot_btke, axis=(1, 2)) * e / (k * n_tokens_b[:, None])
    probs_bte = scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True)
    p_be = jnp.sum(probs_bte * valid_bt[:, :, None], axis=1) / n_tokens_b[:, None]
    return jnp.mean(jnp.sum(f_be * p_be, axis=-1))
