"""Speculative decoding with the MTP heads as the draft model (paper.md §4, checkpoint.md §3M).

One round, with tokens[0..n] fixed and tokens[n] pending:
1. Draft: head k (k = 0..K-1) takes the main hidden state h[n-1] and token n+k (the pending
   token for k = 0, else the previous head's draft) and proposes token n+k+1. Each head keeps
   its own sliding-window cache of rows (h[t], token t+k+1) at position t, exactly its training
   (parallel) form. A row whose token is still a draft is provisional, so every round each head
   recomputes its last K+1 rows (positions n-1-K..n-1) from the fixed tokens plus this round's
   drafts; rows older than that used only accepted tokens and stay valid.
2. Verify: one main forward over [tokens[n], d_1..d_K] at positions n..n+K.
3. Accept (standard speculative sampling): draft d_j survives with probability
   min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is drawn from
   normalize(max(p - q, 0)); if all survive, a bonus token from p_K. With greedy sampling (p, q
   one-hot) this is "longest prefix equal to the main argmax, plus the main model's token", and
   in general the output has exactly the main model's distribution.
4. Commit only the accepted rows to the main caches (the rollback: rejected rows are never
   written, ring buffers included), the tokens and the hidden-state ring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax.inference.decode import main_forward, mtp_forward
from mimo_jax.inference.engine import (
    DecodeState,
    Limits,
    _finished,
    mtp_feed,
    run_loop,
    write_hidden,
)
from mimo_jax.inference.kv_cache import KVCache, commit_main, commit_mtp
from mimo_jax.inference.sampling import SamplingParams, probabilities, sample


def draft(model, cache: KVCache, st: DecodeState, params: SamplingParams, keys, k_draft: int):
    """Drafts [B, K] and their distributions [B, K, V]; the heads' caches updated."""
    cfg = model.cfg
    b, seq = st.tokens.shape
    r = st.hid.shape[1]
    active = ~st.done
    t_bj = st.n[:, None] - 1 - k_draft + jnp.arange(k_draft + 1, dtype=jnp.int32)
    valid_bj = (t_bj >= 0) & active[:, None]
    h_bjd = jnp.take_along_axis(st.hid, (t_bj % r)[:, :, None], axis=1)
    drafts, qs = [], []
    for k in range(k_draft):
        idx_bj = t_bj + k + 1  # the token row t of head k reads
        tok_bj = jnp.take_along_axis(st.tokens, jnp.clip(idx_bj, 0, seq - 1), axis=1)
        for i, d_b in enumerate(drafts):
            tok_bj = jnp.where(idx_bj == st.n[:, None] + i + 1, d_b[:, None], tok_bj)
        out, new = mtp_forward(model, k, cache, h_bjd, tok_bj, t_bj, valid_bj, t_bj[:, 0],
                               last_only=True)
        cache = commit_mtp(cfg, cache, k, new, t_bj, valid_bj)
        q_bv = probabilities(model.lm_logits(out[:, -1:])[:, 0], params)
        drafts.append(sample(keys[k], q_bv))
        qs.append(q_bv)
    return jnp.stack(drafts, 1), jnp.stack(qs, 1), cache


def accept(p_bjv, q_bkv, d_bk, key_u, key_c):
    """Number of accepted drafts [B] and the token after them [B] (speculative sampling)."""
    b, k = d_bk.shape
    p_d = jnp.take_along_axis(p_bjv[:, :k], d_bk[:, :, None], axis=2)[..., 0]
    q_d = jnp.take_along_axis(q_bkv, d_bk[:, :, None], axis=2)[..., 0]
    u = jax.random.uniform(key_u, (b, k))
    ok = u * q_d < p_d  # u < p/q without dividing; q_d > 0 since d was drawn from q
    a_b = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_a = jnp.take_along_axis(p_bjv, a_b[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(q_bkv, jnp.minimum(a_b, k - 1)[:, None, None], axis=1)[:, 0]
    q_a = jnp.where((a_b < k)[:, None], q_a, 0.0)
    resid = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_a)
    return a_b, sample(key_c, resid)


def spec_step(model, cache: KVCache, st: DecodeState, params: SamplingParams, limits: Limits,
              k_draft: int):
    """One draft-verify-accept round for every active row."""
    b, seq = st.tokens.shape
    active = ~st.done
    keys = jax.random.split(jax.random.fold_in(limits.key, st.step), k_draft + 2)
    d_bk, q_bkv, cache = draft(model, cache, st, params, keys, k_draft)

    j = jnp.arange(k_draft + 1, dtype=jnp.int32)
    pending = jnp.take_along_axis(st.tokens, st.n[:, None], axis=1)
    ids = jnp.concatenate([pending, d_bk], axis=1)
    pos = st.n[:, None] + j
    h, hn, pnew, bnew = main_forward(model, cache, ids, pos, active[:, None] & (j >= 0), st.n)
    p_bjv = probabilities(model.lm_logits(hn), params)
    a_b, corr_b = accept(p_bjv, q_bkv, d_bk, keys[k_draft], keys[k_draft + 1])
    new_bj = jnp.where(j < a_b[:, None], jnp.pad(d_bk, ((0, 0), (0, 1))), corr_b[:, None])

    # Stop at the budget and at the first stop token.
    budget = jnp.minimum(limits.max_new - st.generated, seq - 1 - st.n)
    m_b = jnp.minimum(a_b + 1, budget)
    is_stop = jnp.any(new_bj[:, :, None] == limits.stop_ids, axis=-1) & (j < m_b[:, None])
    m_b = jnp.where(jnp.any(is_stop, 1), jnp.minimum(m_b, jnp.argmax(is_stop, 1) + 1), m_b)
    m_b = jnp.where(active, m_b, 0)
    keep = j < m_b[:, None]

    cache = commit_main(model.cfg, cache, pnew, bnew, pos, keep)
    hid = write_hidden(st.hid, mtp_feed(model, h, hn), pos, keep)
    tok_slot = jnp.where(keep, pos + 1, seq)
    tokens = st.tokens.at[jnp.arange(b)[:, None], tok_slot].set(new_bj, mode="drop")
    n = st.n + m_b
    gen = st.generated + m_b
    last = jnp.take_along_axis(new_bj, jnp.maximum(m_b - 1, 0)[:, None], axis=1)[:, 0]
    done = st.done | (active & _finished(last, limits.stop_ids, gen, n, limits.max_new, seq))
    return cache, st._replace(
        tokens=tokens, n=n, done=done, generated=gen, hid=hid,
        rounds=st.rounds + active, produced=st.produced + m_b, step=st.step + 1,
    )


def speculative_loop(static, state, cache, tokens, lengths, hid, last_logits, params, limits):
    """static = (graphdef, k_draft)."""
    return run_loop(spec_step, static, state, cache, tokens, lengths, hid, last_logits,
                    params, limits)
