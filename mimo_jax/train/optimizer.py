"""AdamW with the paper's settings (§2): betas 0.9/0.95, weight decay 0.1 off norms, sinks and
biases, global-norm clipping 1.0, and a warmup -> constant -> cosine learning-rate schedule."""

from __future__ import annotations

import optax
from flax import nnx

from mimo_jax.train.config import TrainConfig


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr, constant lr, then cosine lr -> end_lr over the last decay_steps."""
    warmup = optax.linear_schedule(0.0, tc.lr, max(tc.warmup_steps, 1))
    parts, boundaries = [warmup], [tc.warmup_steps]
    if tc.decay_steps:
        constant_steps = max(tc.steps - tc.warmup_steps - tc.decay_steps, 0)
        parts.append(optax.constant_schedule(tc.lr))
        boundaries.append(tc.warmup_steps + constant_steps)
        parts.append(optax.cosine_decay_schedule(tc.lr, tc.decay_steps, alpha=tc.end_lr / tc.lr))
    else:
        parts.append(optax.constant_schedule(tc.lr))
    if tc.warmup_steps == 0:
        parts, boundaries = parts[1:], boundaries[1:]
    return optax.join_schedules(parts, boundaries) if boundaries else parts[0]


def _decays(path: tuple) -> bool:
    names = [p for p in path if isinstance(p, str)]
    if names and names[-1] in ("sinks", "bias", "correction_bias"):
        return False
    return not any(n.endswith("norm") for n in names)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for matrices (projections, embeddings, experts, router), False for norms/sinks."""
    flat = [(path, var.replace(_decays(path))) for path, var in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(
            lr_schedule(tc),
            b1=tc.b1,
            b2=tc.b2,
            eps=tc.eps,
            weight_decay=tc.weight_decay,
            mask=decay_mask,
        ),
    )
