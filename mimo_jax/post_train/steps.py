"""The jitted updates of post-training: supervised fine-tuning on answers (teachers, the SFT
baseline) and the MOPD step (Eq. 7/9 + IcePop, student log-probs under routing replay).

Trained: every `nnx.Param` except the MTP heads' (MOPD and answer SFT give them no
signal; AdamW's decoupled decay would still shrink them). The router correction bias is
moved outside the optimiser, as in pre-training, by `bias_gamma` (0 = frozen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train.logprobs import sequence_logprobs
from mimo_jax.post_train.loss import mopd_loss
from mimo_jax.train.balance import update_bias

TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("mtp")))


def split_trainable(model: MiMo):
    """(graphdef, trained params, everything else)."""
    return nnx.split(model, TRAINABLE, ...)


def make_sft_step(graphdef: nnx.GraphDef, cfg: ModelConfig, tx: optax.GradientTransformation,
                  bias_gamma: float) -> Callable[..., Any]:
    """step(params, rest, opt_state, tokens [B, L], lengths [B], mask [B, L]) -> (params,
    rest, opt_state, metrics): mean NLL of the masked (answer) tokens."""

    def loss_fn(params, rest, tokens, lengths, mask):
        model = nnx.merge(graphdef, params, rest)
        logp, router = sequence_logprobs(model, tokens, lengths)
        m = mask.astype(jnp.float32)
        return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0), router

    def step(params, rest, opt_state, tokens, lengths, mask):
        (loss, router), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, rest, tokens, lengths, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if router is not None and bias_gamma:
            rest = update_bias(rest, router.expert_load, bias_gamma, cfg)
        return params, rest, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step)


def make_mopd_step(graphdef: nnx.GraphDef, cfg: ModelConfig, tx: optax.GradientTransformation,
                   *, alpha: float, eps_low: float, eps_high: float, temperature: float,
                   bias_gamma: float, routing_replay: bool, measure_mismatch: bool
                   ) -> Callable[..., Any]:
    """step(params, rest, opt_state, batch) -> (params, rest, opt_state, metrics).

    batch: tokens [B, L], lengths [B], mask [B, L] (response tokens), rollout_logp [B, L],
    teacher_logp [B, L], orm_adv [B], expert_ids [L_moe, B, L, K] (the rollout's routing).
    """

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        replay = batch["expert_ids"] if routing_replay else None
        logp, router = sequence_logprobs(model, batch["tokens"], batch["lengths"],
                                         temperature=temperature, expert_ids=replay)
        parts = mopd_loss(logp, batch["rollout_logp"], batch["teacher_logp"], batch["mask"],
                          batch["orm_adv"], alpha=alpha, eps_low=eps_low, eps_high=eps_high)
        return parts.loss, (parts, logp, router)

    def step(params, rest, opt_state, batch):
        (loss, (parts, logp, router)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, rest, batch)
        mask = batch["mask"].astype(jnp.float32)
        n_tok = jnp.maximum(jnp.sum(mask), 1.0)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "icepop_drop_rate": parts.drop_rate,
            "reverse_kl_b": parts.reverse_kl,
            "rollout_logp_abs_diff": jnp.sum(jnp.abs(logp - batch["rollout_logp"]) * mask) / n_tok,
        }
        if measure_mismatch and router is not None:
            # The trainer's own routing of the rollout (what replay replaces): the share of
            # (MoE layer, token) pairs whose expert set differs from the rollout's.
            free = nnx.merge(graphdef, params, rest)
            logp_free, free_router = sequence_logprobs(free, batch["tokens"], batch["lengths"],
                                                       temperature=temperature)
            valid = (jnp.arange(mask.shape[1])[None, :] < batch["lengths"][:, None] - 1)
            same = _same_sets(free_router.expert_ids, batch["expert_ids"])
            v = valid.astype(jnp.float32)[None]
            metrics["replay_mismatch_rate"] = 1.0 - jnp.sum(same * v) / jnp.maximum(
                jnp.sum(v) * same.shape[0], 1.0)
            metrics["no_replay_logp_abs_diff"] = jnp.sum(
                jnp.abs(logp_free - batch["rollout_logp"]) * mask) / n_tok
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if router is not None and bias_gamma:
            rest = update_bias(rest, router.expert_load, bias_gamma, cfg)
        return params, rest, opt_state, metrics

    return jax.jit(step)


def _same_sets(a_lbtk: jax.Array, b_lbtk: jax.Array) -> jax.Array:
    """1.0 where two top-k choices pick the same experts (in any order)."""
    return (jnp.sort(a_lbtk, -1) == jnp.sort(b_lbtk, -1)).all(-1).astype(jnp.float32)
