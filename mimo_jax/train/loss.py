"""The training objective: next-token CE + lambda * mean MTP-head CE + balance loss (+ z-loss).

Targets (checkpoint.md §3M): the main head at position t predicts token t+1; MTP head k
(0-based) at t predicts token t+k+2. A target counts only when it lies in the same document
(segment id) as position t and that document is not padding (segment id 0), so packing never
leaks across documents. Cross-entropy runs over chunks of tokens with rematerialisation, so
[tokens, vocab] float32 logits exist for one chunk at a time, never for the whole batch.
Losses are returned as sums plus token counts so gradient accumulation can normalise by the
whole batch's counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mimo_jax.model.mimo import MiMo
from mimo_jax.model.moe import RouterOutput


class LossParts(NamedTuple):
    nll_sum: jax.Array  # [1 + n_mtp]: summed CE of the main head, then each MTP head
    count: jax.Array  # [1 + n_mtp]: number of valid targets of each
    z_sum: jax.Array  # []: summed squared log-partition of the main head
    balance: jax.Array  # []: sequence balance loss summed over MoE layers (before coef)
    expert_load: jax.Array  # [L_moe, E] assignments (zeros [0, 0] without MoE)


def shifted_targets(
    ids_bt: jax.Array, segment_ids_bt: jax.Array | None, shift: int
) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], valid [B, T] float32): token t+shift, if in the same non-pad document."""
    b, t = ids_bt.shape
    seg_bt = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    s = min(shift, t)
    tgt_bt = jnp.pad(ids_bt[:, s:], ((0, 0), (0, s)))
    tgt_seg_bt = jnp.pad(seg_bt[:, s:], ((0, 0), (0, s)))
    valid_bt = (tgt_seg_bt == seg_bt) & (seg_bt != 0)
    return tgt_bt, valid_bt.astype(jnp.float32)


def chunked_cross_entropy(
    h_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Per-token (nll [N], log-partition [N]) in float32, `chunk` tokens of logits at a time."""
    n, d = h_nd.shape

    def one_chunk(h_cd, t_c):
        logits_cv = jnp.einsum("cd,dv->cv", h_cd, w_dv.astype(h_cd.dtype)).astype(jnp.float32)
        lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
        picked_c = jnp.take_along_axis(logits_cv, t_c[:, None], axis=-1)[:, 0]
        return lse_c - picked_c, lse_c

    if n <= chunk:
        return one_chunk(h_nd, targets_n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h_kcd = jnp.pad(h_nd, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t_kc = jnp.pad(targets_n, (0, pad)).reshape(n_chunks, chunk)
    # remat: the backward pass recomputes each chunk's logits instead of storing them all.
    body = jax.checkpoint(lambda xs: one_chunk(*xs))
    nll_kc, lse_kc = jax.lax.map(body, (h_kcd, t_kc))
    return nll_kc.reshape(-1)[:n], lse_kc.reshape(-1)[:n]


def loss_parts(model: MiMo, batch: dict[str, jax.Array], *, chunk: int) -> LossParts:
    """Run the model on one (micro)batch and return the summed loss pieces."""
    ids_bt, seg_bt = batch["ids"], batch["segment_ids"]
    n_mtp = len(model.mtp)
    out = model(
        ids_bt,
        positions=batch["positions"],
        segment_ids=seg_bt,
        compute_mtp=n_mtp > 0,
        compute_logits=False,
    )
    hiddens = [out.hidden] + ([out.mtp_hidden[k] for k in range(n_mtp)] if n_mtp else [])
    targets, valids = zip(
        *(shifted_targets(ids_bt, seg_bt, 1 + k) for k in range(1 + n_mtp)), strict=True
    )
    d = out.hidden.shape[-1]
    h_nd = jnp.stack(hiddens).reshape(-1, d)
    w_dv = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    nll_n, lse_n = chunked_cross_entropy(h_nd, w_dv, jnp.stack(targets).reshape(-1), chunk)
    valid_hbt = jnp.stack(valids)
    nll_hbt = nll_n.reshape(valid_hbt.shape) * valid_hbt
    lse_main_bt = lse_n.reshape(valid_hbt.shape)[0]
    router: RouterOutput | None = out.router
    if router is None:
        balance, load = jnp.zeros((), jnp.float32), jnp.zeros((0, 0), jnp.float32)
    else:
        balance, load = jnp.sum(router.balance_loss), router.expert_load
    return LossParts(
        nll_sum=jnp.sum(nll_hbt, axis=(1, 2)),
        count=jnp.sum(valid_hbt, axis=(1, 2)),
        z_sum=jnp.sum(jnp.square(lse_main_bt) * valid_hbt[0]),
        balance=balance,
        expert_load=load,
    )


def total_loss(
    parts: LossParts,
    counts: jax.Array,
    *,
    mtp_lambda: jax.Array | float,
    balance_coef: float,
    z_loss_coef: float,
    num_micro: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss of one microbatch normalised by the whole batch's `counts` [1 + n_mtp].

    Summing this over microbatches gives main CE + lambda * mean_k(head CE_k) + coef * balance
    (+ z-loss) of the whole batch; balance terms are averaged over microbatches.
    """
    denom = jnp.maximum(counts, 1.0)
    ce = parts.nll_sum / denom  # this microbatch's share of each head's mean CE
    loss = ce[0]
    if ce.shape[0] > 1:
        loss = loss + mtp_lambda * jnp.mean(ce[1:])
    loss = loss + balance_coef * parts.balance / num_micro
    z = parts.z_sum / denom[0]
    if z_loss_coef:
        loss = loss + z_loss_coef * z
    return loss, {"ce": ce, "balance": parts.balance / num_micro, "z": z}
