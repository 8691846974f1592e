"""On-policy rollouts for MOPD: sampled continuations with, per token, the sampling policy's
log-prob and the experts every MoE layer routed it to (for rollout routing replay, R3).

Built on the inference engine's pieces (`init_cache`, `commit_main`, the kernels' cached
attention, `probabilities`/`sample`); the cached forward is
`inference.decode.routed_main_forward`, which keeps the routers' choices. One jitted program
per (batch, prompt length, new tokens): the prompt is prefilled in one chunk, then a
`lax.scan` decodes one token per row per step; rows that stopped keep running masked
(fixed shapes, no recompiles).

Layout (as `generate`): row b holds its prompt at 0..len_b-1 and its sampled tokens right
after; `logp[b, t]` is log mu(tokens[b, t] | tokens[b, :t]) for sampled positions, and
`expert_ids[l, b, t]` are the experts MoE layer l chose for token t (prompt tokens included:
every scored log-prob depends on them). Positions never run (padding, the last sampled token)
get the ids 0..K-1, which no scored log-prob depends on (causality).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.inference.decode import routed_main_forward
from mimo_jax.inference.kv_cache import (
    KVCache,
    commit_main,
    init_cache,
)
from mimo_jax.inference.sampling import probabilities, sample, sampling_params
from mimo_jax.model.mimo import MiMo


class Rollout(NamedTuple):
    tokens: np.ndarray  # [B, L] int32 prompt, then sampled tokens, then zeros
    prompt_lengths: np.ndarray  # [B]
    lengths: np.ndarray  # [B] prompt + sampled tokens (a stop token, when hit, included)
    response_mask: np.ndarray  # [B, L] bool: sampled tokens
    logp: np.ndarray  # [B, L] float32 sampling log-prob of each sampled token, 0 elsewhere
    expert_ids: np.ndarray  # [L_moe, B, L, K] int32 routed experts per token


def num_moe_layers(cfg) -> int:
    return sum(t == "moe" for t in cfg.mlp_types)


def routed_forward(model: MiMo, cache: KVCache, ids_bt, pos_bt, valid_bt, start_b):
    """Cached main forward over a chunk. Returns (logits [B, T, V] float32, prefix KV, blocks
    KV, expert ids [L_moe, B, T, K] in layer order)."""
    _, hn, prefix_new, blocks_new, routes = routed_main_forward(
        model, cache, ids_bt, pos_bt, valid_bt, start_b)
    return model.lm_logits(hn).astype(jnp.float32), prefix_new, blocks_new, routes


def _token_logp(logits_bv, tok_b, params):
    """log mu(tok): of the tempered softmax (exact log-softmax) or the filtered distribution."""
    scaled = logits_bv / jnp.maximum(params.temperature, 1e-6)
    plain = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), tok_b[:, None], 1)[:, 0]
    probs = probabilities(logits_bv, params)
    filt = jnp.log(jnp.take_along_axis(probs, tok_b[:, None], 1)[:, 0])
    filtered = (params.top_k > 0) | (params.top_p < 1.0)
    return jnp.where(filtered, filt, plain), probs


def _rollout_fn(static, state, tokens_bl, plen_b, stop_s, key, params):
    graphdef, prompt_len, new_tokens = static
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b, seq = tokens_bl.shape
    k_top = cfg.num_experts_per_tok
    n_moe = num_moe_layers(cfg)
    cache = init_cache(cfg, b, seq)
    routes = jnp.broadcast_to(jnp.arange(k_top, dtype=jnp.int32), (n_moe, b, seq, k_top))
    rows = jnp.arange(b)

    # Prefill: the whole (padded) prompt as one chunk.
    pos = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (b, prompt_len))
    valid = pos < plen_b[:, None]
    start = jnp.zeros((b,), jnp.int32)
    logits, pnew, bnew, ids = routed_forward(model, cache, tokens_bl[:, :prompt_len], pos, valid,
                                             start)
    cache = commit_main(cfg, cache, pnew, bnew, pos, valid)
    if n_moe:
        keep = valid[None, :, :, None]
        routes = routes.at[:, :, :prompt_len].set(jnp.where(keep, ids, routes[:, :, :prompt_len]))
    last = jnp.take_along_axis(logits, (plen_b - 1)[:, None, None], 1)[:, 0]
    logp_bl = jnp.zeros((b, seq), jnp.float32)

    def step(carry, i):
        tokens, logp, routes, cache, last, n, done = carry
        # Sample the token at position n (its logits are `last`), for rows not done.
        probs = probabilities(last, params)
        tok = sample(jax.random.fold_in(key, i), probs)
        lp, _ = _token_logp(last, tok, params)
        live = ~done
        tokens = tokens.at[rows, jnp.where(live, n, seq)].set(tok, mode="drop")
        logp = logp.at[rows, jnp.where(live, n, seq)].set(lp, mode="drop")
        stop = jnp.any(tok[:, None] == stop_s[None, :], axis=1) | (n + 1 >= seq)
        done_next = done | (live & stop) | (i + 1 >= new_tokens)
        # Run the new token (position n) through the model for the next logits.
        run = ~done_next
        ids_in = tok[:, None]
        pos1 = n[:, None]
        lg, pn, bn, r_ids = routed_forward(model, cache, ids_in, pos1, run[:, None], n)
        cache = commit_main(cfg, cache, pn, bn, pos1, run[:, None])
        if n_moe:
            at = jnp.where(run, n, seq)
            routes = routes.at[:, rows, at].set(r_ids[:, :, 0], mode="drop")
        last = jnp.where(run[:, None], lg[:, 0], last)
        n = n + run.astype(jnp.int32)  # finished rows keep n at their last sampled token
        return (tokens, logp, routes, cache, last, n, done_next), None

    done0 = jnp.zeros((b,), bool)
    carry = (tokens_bl, logp_bl, routes, cache, last, plen_b, done0)
    (tokens, logp, routes, _, _, n, _), _ = jax.lax.scan(
        step, carry, jnp.arange(new_tokens, dtype=jnp.int32))
    return tokens, logp, routes, n


_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()


def rollout(
    model: MiMo,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    key: jax.Array,
    stop_tokens: list[int] | tuple[int, ...] = (),
    prompt_len: int | None = None,
) -> Rollout:
    """Sample `max_new_tokens` (or up to a stop token) after each prompt.

    `prompt_len` pads every prompt to this length (default: the next multiple of 8 of the
    longest), so batches of similar prompts share one executable.
    """
    if temperature <= 0:
        raise ValueError("rollouts sample: temperature must be > 0 (greedy has no log-probs)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    params = sampling_params(temperature, top_k, top_p)
    longest = max(len(p) for p in prompts)
    plen = prompt_len or -(-longest // 8) * 8
    if longest > plen:
        raise ValueError(f"a prompt has {longest} tokens but prompt_len is {plen}")
    seq = plen + max_new_tokens
    if seq > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt_len + max_new_tokens = {seq} exceeds the model's "
                         f"max_position_embeddings {model.cfg.max_position_embeddings}")
    b = len(prompts)
    tokens = np.zeros((b, seq), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    plen_b = np.asarray([len(p) for p in prompts], np.int32)
    stops = np.full((max(8, len(stop_tokens)),), -1, np.int32)
    stops[: len(stop_tokens)] = stop_tokens
    graphdef, state = nnx.split(model)
    static = (graphdef, plen, max_new_tokens)
    args = (state, jnp.asarray(tokens), jnp.asarray(plen_b), jnp.asarray(stops), key, params)
    leaves, tree = jax.tree.flatten(args)
    ck = (static, tree, tuple((x.shape, str(x.dtype)) for x in leaves))
    exe = _EXECUTABLES.get(ck)
    if exe is None:
        exe = jax.jit(lambda *a: _rollout_fn(static, *a)).lower(*args).compile()
        _EXECUTABLES[ck] = exe
        while len(_EXECUTABLES) > 8:
            _EXECUTABLES.popitem(last=False)
    out_tokens, logp, routes, n = jax.device_get(exe(*args))
    lengths = np.asarray(n, np.int32) + 1  # n indexes the last sampled token
    pos = np.arange(seq)[None, :]
    mask = (pos >= plen_b[:, None]) & (pos < lengths[:, None])
    return Rollout(np.asarray(out_tokens), plen_b, lengths, mask,
                   np.where(mask, logp, 0.0).astype(np.float32), np.asarray(routes))
