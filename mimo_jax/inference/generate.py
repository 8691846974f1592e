"""`generate(model, prompts, ...)`: batched, jit-compiled generation with optional MTP speculation.

Shapes are static per (batch, max_len, prefill chunk, K): the prefill runs chunk by chunk
through one compiled program and the whole decode loop is one `lax.while_loop` program, so
nothing recompiles per token; sampling settings, seeds, stop tokens and max_new_tokens are
runtime values. `max_len` defaults to the next power of two >= prompt + new tokens, so calls
of similar size share their executables. Executables are compiled ahead of time and kept, so
`tokens_per_second` excludes compilation (reported as `compile_seconds`).

A sharded model (`mimo_jax.load(path, mesh=mesh)`, `create_sharded`) generates on its mesh:
batch rows over the batch axes, heads over `tensor`, experts over `expert` (the model's
expert-parallel path), KV caches created directly in their shards (see placement.py).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mimo_jax.inference.engine import TRACE_COUNTS, Limits, plain_loop, prefill_chunk
from mimo_jax.inference.kv_cache import KVCache, init_cache
from mimo_jax.inference.placement import batch_sharding, cache_shardings, serving_mesh
from mimo_jax.inference.sampling import sampling_params
from mimo_jax.inference.speculative import speculative_loop
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import MiMo
from mimo_jax.sharding.rules import ShardingRules, activate

_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is the last one)
    text: list[str] | None  # decoded new tokens (stop token dropped) when a tokenizer is given
    acceptance_length: float | None  # tokens per verify forward (None without speculation)
    tokens_per_second: float  # new tokens of the whole batch / (prefill + decode) seconds
    num_new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float  # 0.0 when every executable was already compiled
    prompt_lengths: list[int] = dataclasses.field(default_factory=list)
    # Per row: tokens per verify forward (rows accept different numbers of drafts and advance
    # by different amounts); None without speculation.
    row_acceptance_lengths: list[float] | None = None


def _compiled(name: str, fn, static: tuple, args: tuple, donate: tuple[int, ...] = (),
              ctx: tuple[Mesh, ShardingRules] | None = None):
    """The executable for these shapes (and mesh), traced under the mesh when there is one
    (activation constraints, expert parallelism, per-shard attention)."""
    leaves, tree = jax.tree.flatten(args)
    key = (name, static, tree, tuple((x.shape, str(x.dtype)) for x in leaves), ctx)
    exe = _EXECUTABLES.get(key)
    seconds = 0.0
    if exe is None:
        t0 = time.perf_counter()
        jitted = jax.jit(lambda *a: fn(static, *a), donate_argnums=donate)
        if ctx is None:
            exe = jitted.lower(*args).compile()
        else:
            with activate(*ctx):
                exe = jitted.lower(*args).compile()
        seconds = time.perf_counter() - t0
        _EXECUTABLES[key] = exe
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    else:
        _EXECUTABLES.move_to_end(key)
    return exe, seconds


def _encode(prompts, tokenizer, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))
    ):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists or strings")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer (pass tokenizer=...)")
            ids = [int(t) for t in tokenizer.encode(p, parse_special=True)]  # chat markup
            if getattr(tokenizer, "bos_id", None) is not None:
                ids = [int(tokenizer.bos_id)] + ids  # as the training pipeline does
            if not p:
                ids = []
        else:
            ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


def _next_pow2(x: int, lo: int) -> int:
    return max(lo, 1 << (max(x, 1) - 1).bit_length())


def new_cache(cfg: ModelConfig, batch: int, max_len: int, mtp_heads: int,
              ctx: tuple[Mesh, ShardingRules] | None) -> KVCache:
    """An empty cache, created directly in its shards on a mesh (never whole on a device)."""
    make = lambda: init_cache(cfg, batch, max_len, mtp_heads=mtp_heads)  # noqa: E731
    if ctx is None:
        return make()
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), *ctx, cfg))()


def generate(
    model: MiMo,
    prompts: Any,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    speculative: int = 0,
    tokenizer: Any = None,
    max_len: int | None = None,
    prefill_chunk_size: int = 256,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> GenerateOutput:
    """Generate continuations of a batch of prompts.

    Args:
      prompts: a list of token-id lists (or strings, with `tokenizer`; BOS is prepended when the
        tokenizer has one, as in training, and special tokens' text such as "<|im_start|>" maps
        to their ids). Rows may differ in length (right-padded inside).
      temperature: 0 = greedy; top_k (0 = off) and top_p (1 = off) filter before sampling.
      stop_tokens: ids that end a row (default: the tokenizer's EOS, else the config's).
      speculative: K > 0 drafts K tokens per step with the first K MTP heads.
      max_len: cache length (prompt + new tokens); default: the next power of two that fits.
      mesh, rules: generate over this mesh; default: the mesh the model's parameters live on
        (found from their shardings, with the preset rules that placed them) or the one of an
        enclosing `mimo_jax.sharding.activate` block; one device for an unsharded model.
    """
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    k_draft = int(speculative)
    if k_draft < 0:
        raise ValueError(f"speculative must be >= 0, got {k_draft}")
    if k_draft > len(model.mtp):
        raise ValueError(
            f"speculative={k_draft} needs {k_draft} MTP heads but the model has {len(model.mtp)}"
            + (" (this checkpoint has no MTP weights)" if not len(model.mtp) else "")
        )
    window = cfg.sliding_attention.window
    if k_draft and (window is None or k_draft + 1 > window):
        raise ValueError(f"speculative={k_draft} needs a sliding window of >= {k_draft + 1} keys")
    params = sampling_params(temperature, top_k, top_p)
    ctx = serving_mesh(model, mesh, rules)
    ids = _encode(prompts, tokenizer, cfg.vocab_size)
    lengths = [len(p) for p in ids]
    longest = max(lengths)
    if max_len is None:
        max_len = min(_next_pow2(longest + max_new_tokens, 64), cfg.max_position_embeddings)
    limit = min(max_len, cfg.max_position_embeddings)
    if longest >= limit:
        raise ValueError(
            f"prompt of {longest} tokens does not fit: the maximum length is {limit} tokens "
            f"(max_len={max_len}, max_position_embeddings={cfg.max_position_embeddings}), "
            "and at least one new token must fit"
        )
    if stop_tokens is None:
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else cfg.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stops = np.full((_next_pow2(len(stop_tokens), 8),), -1, np.int32)  # bucketed: no recompiles
    stops[: len(stop_tokens)] = stop_tokens

    b = len(ids)
    tokens = np.zeros((b, max_len), np.int32)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = p
    chunk = min(prefill_chunk_size, _next_pow2(longest, 16), max_len)
    graphdef, state = nnx.split(model)
    cache = new_cache(cfg, b, max_len, k_draft, ctx)
    r = k_draft + 1

    def rows(x):  # batch-leading arrays: rows over the mesh's batch axes
        x = jnp.asarray(x)
        return x if ctx is None else jax.device_put(x, batch_sharding(*ctx, x.shape))

    hid = rows(jnp.zeros((b, r, cfg.hidden_size), jnp.dtype(cfg.dtype)))
    tokens_j, lengths_j = rows(tokens), rows(np.asarray(lengths, np.int32))
    last_logits = rows(jnp.zeros((b, cfg.vocab_size), jnp.float32))
    limits = Limits(jnp.asarray(stops), jnp.int32(max_new_tokens), jax.random.key(seed))

    compile_s = 0.0
    # Heads beyond K are never used: they get no cache.
    pre_static = (graphdef, chunk, k_draft)
    exe, s = _compiled("prefill", prefill_chunk, pre_static,
                       (state, cache, hid, tokens_j, lengths_j, jnp.int32(0), last_logits),
                       donate=(1, 2), ctx=ctx)
    compile_s += s
    if k_draft:
        loop_fn, loop_static = speculative_loop, (graphdef, k_draft)
    else:
        loop_fn, loop_static = plain_loop, (graphdef,)
    loop_args = (state, cache, tokens_j, lengths_j, hid, last_logits, params, limits)
    loop_exe, s = _compiled(loop_fn.__name__, loop_fn, loop_static, loop_args, donate=(1,),
                            ctx=ctx)
    compile_s += s

    t0 = time.perf_counter()
    for start in range(0, longest, chunk):
        cache, hid, last_logits = exe(state, cache, hid, tokens_j, lengths_j, jnp.int32(start),
                                      last_logits)
    jax.block_until_ready(last_logits)
    t1 = time.perf_counter()
    cache, st = loop_exe(state, cache, tokens_j, lengths_j, hid, last_logits, params, limits)
    out_tokens = np.asarray(st.tokens)
    t2 = time.perf_counter()

    n_final = np.asarray(st.n)
    new = [out_tokens[i, lengths[i] : n_final[i] + 1].tolist() for i in range(b)]
    total = int(sum(len(x) for x in new))
    text = None
    if tokenizer is not None:
        stop_set = set(int(t) for t in stop_tokens)
        text = [tokenizer.decode([t for t in x if t not in stop_set]) for x in new]
    acceptance = row_acceptance = None
    if k_draft:
        rounds_b, produced_b = np.asarray(st.rounds), np.asarray(st.produced)
        acceptance = float(produced_b.sum()) / max(int(rounds_b.sum()), 1)
        row_acceptance = [float(p) / max(int(r), 1) for p, r in zip(produced_b, rounds_b,
                                                                      strict=True)]
    return GenerateOutput(
        tokens=new,
        text=text,
        acceptance_length=acceptance,
        tokens_per_second=total / max(t2 - t0, 1e-9),
        num_new_tokens=total,
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        compile_seconds=compile_s,
        prompt_lengths=lengths,
        row_acceptance_lengths=row_acceptance,
    )


def trace_counts() -> dict[str, int]:
    """How often each jitted piece was traced (compiled) in this process."""
    return dict(TRACE_COUNTS)
