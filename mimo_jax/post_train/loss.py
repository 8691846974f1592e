"""The MOPD objective (MiMo-V2-Flash report, Eqs. 7-9) with IcePop masking.

    A_t  = sg[log pi_teacher(y_t) - log pi_theta(y_t)] + alpha * A_orm        (Eq. 9)
    r_t  = pi_theta(y_t) / mu(y_t)            training over rollout probability
    w_t  = sg[r_t] if eps_low <= r_t <= eps_high else 0                      (Eq. 8, IcePop)
    L    = -mean_seq( (1/|y|) sum_t w_t * A_t * log pi_theta(y_t) )          (Eq. 7)

No PPO clipping; |y| counts every response token, dropped ones included (dropping a token
removes its gradient, not its share of the sequence). A_orm is the GRPO group-normalised
outcome advantage (r - mean) / (std + eps) over the samples of one prompt; a group of one
sample, or of equal rewards, has advantage 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossParts(NamedTuple):
    loss: jax.Array  # []
    weights: jax.Array  # [B, T] w_t (0 outside the response and for dropped tokens)
    advantages: jax.Array  # [B, T] A_t
    ratio: jax.Array  # [B, T] pi / mu
    drop_rate: jax.Array  # [] dropped / response tokens
    reverse_kl: jax.Array  # [B] token-mean of log pi - log pi_teacher per sequence


def group_advantages(rewards_b: jax.Array, group_b: jax.Array, num_groups: int,
                     eps: float = 1e-6) -> jax.Array:
    """(r - mean_g) / (std_g + eps) with the population std of each prompt's samples."""
    r = rewards_b.astype(jnp.float32)
    ones = jnp.ones_like(r)
    count = jax.ops.segment_sum(ones, group_b, num_groups)
    mean = jax.ops.segment_sum(r, group_b, num_groups) / jnp.maximum(count, 1)
    dev = r - mean[group_b]
    var = jax.ops.segment_sum(dev * dev, group_b, num_groups) / jnp.maximum(count, 1)
    return dev / (jnp.sqrt(var)[group_b] + eps)


def mopd_loss(
    logp_bt: jax.Array,
    rollout_logp_bt: jax.Array,
    teacher_logp_bt: jax.Array,
    mask_bt: jax.Array,
    orm_adv_b: jax.Array,
    *,
    alpha: float,
    eps_low: float,
    eps_high: float,
) -> LossParts:
    """Eq. 7/9 with IcePop, differentiable in `logp_bt` (the trainer's log pi_theta)."""
    mask = mask_bt.astype(jnp.float32)
    lp = jax.lax.stop_gradient(logp_bt)
    ratio = jnp.exp(lp - rollout_logp_bt)
    keep = (ratio >= eps_low) & (ratio <= eps_high) & (mask > 0)
    w = jnp.where(keep, ratio, 0.0)
    adv = (teacher_logp_bt - lp) + alpha * orm_adv_b[:, None]
    n_b = jnp.sum(mask, axis=1)
    per_seq = jnp.sum(w * adv * logp_bt * mask, axis=1) / jnp.maximum(n_b, 1.0)
    has = (n_b > 0).astype(jnp.float32)
    loss = -jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)
    total = jnp.maximum(jnp.sum(mask), 1.0)
    drop = jnp.sum(mask * (1.0 - keep)) / total
    rkl = jnp.sum((lp - teacher_logp_bt) * mask, axis=1) / jnp.maximum(n_b, 1.0)
    return LossParts(loss, w * mask, adv * mask, ratio * mask, drop, rkl)
