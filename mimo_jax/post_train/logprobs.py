"""Per-token log-probs of given sequences under a model (the trainer's pi_theta, a teacher's
prefill), optionally replaying recorded routing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax.model.mimo import MiMo


def sequence_logprobs(
    model: MiMo,
    tokens_bl: jax.Array,
    lengths_b: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    expert_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """log softmax(logits / temperature) of each token given its prefix.

    Rows are left-aligned sequences of `lengths_b` tokens (right padding is masked out of
    attention). Returns ([B, L] float32 with 0 at position 0 and past the length, the router
    output of the forward: with `expert_ids` [L_moe, B, L, K], the replayed routing).
    """
    b, seq = tokens_bl.shape
    pos = jnp.arange(seq, dtype=jnp.int32)[None, :]
    segment_ids = (pos < lengths_b[:, None]).astype(jnp.int32)
    out = model(tokens_bl, segment_ids=segment_ids, positions=jnp.broadcast_to(pos, (b, seq)),
                expert_ids=expert_ids, compute_mtp=False)
    logits = out.logits[:, :-1].astype(jnp.float32) / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens_bl[:, 1:, None], -1)[..., 0]
    logp = jnp.pad(logp, ((0, 0), (1, 0)))
    return jnp.where((pos > 0) & (pos < lengths_b[:, None]), logp, 0.0), out.router
