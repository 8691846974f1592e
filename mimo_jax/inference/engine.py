"""The jitted pieces of generation: a prefill chunk, the first token, the plain decode loop.

Batches are right-padded: row b holds its prompt at positions 0..len_b-1 of a [B, max_len]
token buffer, and every row decodes at its own position (per-row RoPE positions and cache
masks), so a row's result does not depend on the other rows' lengths.

State per row: tokens[0..n] are fixed; tokens[n] is the "pending" token not yet run through
the main model (the cache holds positions 0..n-1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.inference.decode import main_forward, mtp_forward
from mimo_jax.inference.kv_cache import KVCache, commit_main, commit_mtp
from mimo_jax.inference.placement import constrain_cache
from mimo_jax.inference.sampling import SamplingParams, probabilities, sample
from mimo_jax.sharding.rules import active, constrain

# Incremented while tracing (never while running): tests use it to prove nothing recompiles.
TRACE_COUNTS: dict[str, int] = {}


def _traced(name: str) -> None:
    TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


class DecodeState(NamedTuple):
    tokens: jax.Array  # [B, L] prompt then generated tokens
    n: jax.Array  # [B] index of the pending token
    done: jax.Array  # [B]
    generated: jax.Array  # [B] new tokens so far (incl. the one sampled from the prefill)
    hid: jax.Array  # [B, R, D] main hidden (as fed to MTP) of the last R positions, slot = pos % R
    rounds: jax.Array  # [B] speculative verify forwards
    produced: jax.Array  # [B] tokens produced by those forwards
    step: jax.Array  # [] loop iterations (for the random stream)


class Limits(NamedTuple):
    stop_ids: jax.Array  # [S] int32, -1 = unused
    max_new: jax.Array  # [] int32
    key: jax.Array  # PRNG key


def mtp_feed(model, h_btd: jax.Array, hn_btd: jax.Array) -> jax.Array:
    return hn_btd if model.cfg.mtp_hidden == "post_norm" else h_btd


def write_hidden(hid_brd, feed_btd, pos_bt, keep_bt):
    """Keep the last R kept rows of each row in the hidden ring."""
    r = hid_brd.shape[1]
    last_b = jnp.max(jnp.where(keep_bt, pos_bt, -1), axis=1, keepdims=True)
    keep_bt = keep_bt & (pos_bt > last_b - r)
    slot_bt = jnp.where(keep_bt, pos_bt % r, r)
    b_bt = jnp.broadcast_to(jnp.arange(hid_brd.shape[0])[:, None], slot_bt.shape)
    return hid_brd.at[b_bt, slot_bt].set(feed_btd.astype(hid_brd.dtype), mode="drop")


def prefill_chunk(
    static, state: nnx.State, cache: KVCache, hid, tokens, lengths, chunk_start, last_logits
):
    """Run prompt positions chunk_start..chunk_start+C-1 of every row (padding rows masked);
    fill the main caches and, with MTP, each head's cache with rows (h[t], token t+k+1)."""
    _traced("prefill_chunk")
    graphdef, chunk, n_heads = static
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, seq = tokens.shape
    pos = chunk_start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
    valid = pos < lengths[:, None]
    ids = jnp.take_along_axis(tokens, jnp.clip(pos, 0, seq - 1), axis=1)
    start = jnp.full((b,), chunk_start, jnp.int32)
    h, hn, pnew, bnew = main_forward(model, cache, ids, pos, valid, start)
    feed = mtp_feed(model, h, hn)
    for k in range(n_heads):
        # Tokens past the prompt are unknown yet: those rows are recomputed by the first draft.
        nxt = pos + k + 1
        tok = jnp.take_along_axis(tokens, jnp.clip(nxt, 0, seq - 1), axis=1)
        tok = jnp.where(nxt < lengths[:, None], tok, 0)
        _, new = mtp_forward(model, k, cache, feed, tok, pos, valid, start)
        cache = commit_mtp(cfg, cache, k, new, pos, valid)
    cache = constrain_cache(commit_main(cfg, cache, pnew, bnew, pos, valid), active(), cfg)
    if n_heads:
        hid = write_hidden(hid, feed, pos, valid)
    # Logits of each row's last prompt position, if it falls in this chunk.
    idx = jnp.clip(lengths - 1 - chunk_start, 0, chunk - 1)
    hn_last = jnp.take_along_axis(hn, idx[:, None, None], axis=1)  # [B, 1, D]
    here = (lengths - 1 >= chunk_start) & (lengths - 1 < chunk_start + chunk)
    logits = model.lm_logits(hn_last)[:, 0].astype(jnp.float32)
    last_logits = jnp.where(here[:, None], logits, last_logits)
    # Outputs keep the inputs' shardings, so the next chunk and the loop reuse one executable.
    return cache, constrain(hid, ("batch", None, None)), constrain(last_logits, ("batch", None))


def _finished(tok_b, stop_ids, gen_b, n_b, max_new, seq):
    stop_b = jnp.any(tok_b[:, None] == stop_ids[None, :], axis=1)
    return stop_b | (gen_b >= max_new) | (n_b >= seq - 1)


def first_token(tokens, lengths, hid, last_logits, params: SamplingParams, limits: Limits):
    """Sample token len_b from the prefill's last logits; the initial decode state."""
    b, seq = tokens.shape
    key = jax.random.fold_in(limits.key, 1 << 30)
    tok = sample(key, probabilities(last_logits, params))
    tokens = tokens.at[jnp.arange(b), lengths].set(tok, mode="drop")
    gen = jnp.ones((b,), jnp.int32)
    done = _finished(tok, limits.stop_ids, gen, lengths, limits.max_new, seq)
    zeros = jnp.zeros((b,), jnp.int32)
    return DecodeState(tokens, lengths, done, gen, hid, zeros, zeros, jnp.zeros((), jnp.int32))


def plain_step(model, cache: KVCache, st: DecodeState, params: SamplingParams, limits: Limits):
    """One token per active row."""
    b, seq = st.tokens.shape
    active = ~st.done
    ids = jnp.take_along_axis(st.tokens, st.n[:, None], axis=1)
    pos = st.n[:, None]
    h, hn, pnew, bnew = main_forward(model, cache, ids, pos, active[:, None], st.n)
    cache = commit_main(model.cfg, cache, pnew, bnew, pos, active[:, None])
    probs = probabilities(model.lm_logits(hn)[:, 0], params)
    tok = sample(jax.random.fold_in(limits.key, st.step), probs)
    n = st.n + active
    tokens = st.tokens.at[jnp.arange(b), jnp.where(active, n, seq)].set(tok, mode="drop")
    gen = st.generated + active
    done = st.done | _finished(tok, limits.stop_ids, gen, n, limits.max_new, seq)
    return cache, st._replace(tokens=tokens, n=n, done=done, generated=gen, step=st.step + 1)


def run_loop(step_fn, static, state, cache, tokens, lengths, hid, last_logits, params, limits):
    """First token, then `step_fn` until every row is done; one jitted program."""
    _traced("decode_loop")
    graphdef = static[0]
    st = first_token(tokens, lengths, hid, last_logits, params, limits)

    def body(carry):
        cache, st = carry
        model = nnx.merge(graphdef, state)
        cache, st = step_fn(model, cache, st, params, limits, *static[1:])
        return constrain_cache(cache, active(), model.cfg), st

    def cond(carry):
        return jnp.any(~carry[1].done)

    return jax.lax.while_loop(cond, body, (cache, st))


def plain_loop(static, state, cache, tokens, lengths, hid, last_logits, params, limits):
    def step(model, cache, st, params, limits):
        return plain_step(model, cache, st, params, limits)

    return run_loop(step, static, state, cache, tokens, lengths, hid, last_logits, params, limits)
