"""The training objective: next-token CE + lambda * mean MTP-head CE + balance loss (+ z-loss).

Targets (checkpoint.md §3M): the main head at position t predicts token t+1; MTP head k
(0-based) at t predicts token t+k+2. A target counts only when it lies in the same document
(segment id) as position t and that document is not padding (segment id 0), so packing never
leaks across documents. Cross-entropy is a fused LM head + softmax over chunks of tokens with
its own VJP, so [tokens, vocab] float32 logits exist for one chunk at a time, never for the
whole batch, and the backward never materialises them twice.
Losses are returned as sums plus token counts so gradient accumulation can normalise by the
whole batch's counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    """Per-token (nll [N], log-partition [N]) in float32, `chunk` tokens of logits at a time.

    A fused LM head + cross-entropy with its own VJP: the forward keeps only the per-token
    log-partition; the backward recomputes each chunk's logits once and forms
    d logits = softmax * (g_nll + g_lse) - g_nll * onehot(target) in place, so [chunk, V]
    float32 exists once per chunk (no gather transpose / scatter into [N, V], no second copy).
    """
    n, d = h_nd.shape
    c = min(chunk, n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    h_kcd = jnp.pad(h_nd, ((0, pad), (0, 0))).reshape(n_chunks, c, d)
    t_kc = jnp.pad(targets_n.astype(jnp.int32), (0, pad)).reshape(n_chunks, c)
    nll_kc, lse_kc = _fused_ce(h_kcd, w_dv, t_kc)
    return nll_kc.reshape(-1)[:n], lse_kc.reshape(-1)[:n]


def _chunk_logits(h_cd: jax.Array, w_dv: jax.Array) -> jax.Array:
    return jnp.einsum("cd,dv->cv", h_cd, w_dv.astype(h_cd.dtype),
                      preferred_element_type=jnp.float32)


def _over_chunks(fn, *xs):
    """``fn`` on each leading-axis slice: directly for a single chunk, else ``lax.map``."""
    if xs[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], fn(*(x[0] for x in xs)))
    return jax.lax.map(lambda a: fn(*a), xs)


@jax.custom_vjp
def _fused_ce(h_kcd: jax.Array, w_dv: jax.Array, t_kc: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _fused_ce_fwd(h_kcd, w_dv, t_kc)[0]


def _fused_ce_fwd(h_kcd, w_dv, t_kc):
    def one(h_cd, t_c):
        logits_cv = _chunk_logits(h_cd, w_dv)
        lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
        picked_c = jnp.take_along_axis(logits_cv, t_c[:, None], axis=-1)[:, 0]
        return lse_c - picked_c, lse_c

    nll_kc, lse_kc = _over_chunks(one, h_kcd, t_kc)
    return (nll_kc, lse_kc), (h_kcd, w_dv, t_kc, lse_kc)


def _fused_ce_bwd(res, cts):
    h_kcd, w_dv, t_kc, lse_kc = res
    g_nll_kc, g_lse_kc = (g.astype(jnp.float32) for g in cts)
    v = w_dv.shape[1]

    def one(h_cd, t_c, lse_c, g_nll_c, g_lse_c):
        logits_cv = _chunk_logits(h_cd, w_dv)
        p_cv = jnp.exp(logits_cv - lse_c[:, None])
        onehot_cv = t_c[:, None] == jnp.arange(v, dtype=jnp.int32)[None, :]
        dlogits_cv = p_cv * (g_nll_c + g_lse_c)[:, None] - jnp.where(onehot_cv, g_nll_c[:, None], 0)
        dh_cd = jnp.einsum("cv,dv->cd", dlogits_cv.astype(h_cd.dtype), w_dv.astype(h_cd.dtype),
                           preferred_element_type=jnp.float32)
        dw_dv = jnp.einsum("cd,cv->dv", h_cd, dlogits_cv.astype(h_cd.dtype),
                           preferred_element_type=jnp.float32)
        return dh_cd.astype(h_cd.dtype), dw_dv

    xs = (h_kcd, t_kc, lse_kc, g_nll_kc, g_lse_kc)
    if h_kcd.shape[0] == 1:
        dh_cd, dw_dv = one(*(x[0] for x in xs))
        dh_kcd = dh_cd[None]
    else:  # dW accumulates in float32 across chunks
        def body(dw_dv, x):
            dh_cd, dw_c = one(*x)
            return dw_dv + dw_c, dh_cd

        dw_dv, dh_kcd = jax.lax.scan(body, jnp.zeros(w_dv.shape, jnp.float32), xs)
    dt = np.zeros(t_kc.shape, jax.dtypes.float0)
    return dh_kcd, dw_dv.astype(w_dv.dtype), dt


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


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
