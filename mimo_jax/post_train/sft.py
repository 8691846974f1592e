"""Supervised fine-tuning on (prompt, answer) pairs, the loss on the answer and EOS only:
how the demo's domain teachers and its SFT baseline are trained."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train.steps import make_sft_step, split_trainable
from mimo_jax.post_train.tasks import encode_prompt
from mimo_jax.train.config import TrainConfig
from mimo_jax.train.optimizer import make_optimizer


def answer_batch(tok: Any, pairs: list[tuple[str, Any]], seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [B, L], lengths [B], mask [B, L] (answer + EOS positions) of prompt+answer rows.
    An answer is text (EOS appended) or a list of token ids (taken as they are)."""
    b = len(pairs)
    tokens = np.zeros((b, seq_len), np.int32)
    mask = np.zeros((b, seq_len), bool)
    lengths = np.zeros((b,), np.int32)
    for i, (p, a) in enumerate(pairs):
        pid = encode_prompt(tok, p)
        if isinstance(a, str):
            aid = [int(t) for t in tok.encode(a)] + ([int(tok.eos_id)]
                                                     if tok.eos_id is not None else [])
        else:  # token ids as sampled (a stop token included when one was hit)
            aid = [int(t) for t in a]
        row = pid + aid
        if len(row) > seq_len:
            raise ValueError(f"prompt + answer of {len(row)} tokens exceed seq_len {seq_len}")
        tokens[i, : len(row)] = row
        mask[i, len(pid) : len(row)] = True
        lengths[i] = len(row)
    return tokens, lengths, mask


def sft(model: MiMo, draw: Callable[[np.random.Generator, int], list[tuple[str, str]]],
        tok: Any, *, steps: int, batch_size: int, seq_len: int, lr: float,
        warmup_steps: int = 20, bias_gamma: float = 1e-3, seed: int = 0,
        log: Callable[[str], None] | None = None, log_every: int = 100
        ) -> tuple[MiMo, list[float], int]:
    """Train `model` for `steps` on batches `draw(rng, batch_size)`; returns (model, losses,
    answer tokens trained on)."""
    tc = TrainConfig(lr=lr, end_lr=lr, warmup_steps=warmup_steps, decay_steps=0, steps=steps,
                     weight_decay=0.0)
    tx = make_optimizer(tc)
    graphdef, params, rest = split_trainable(model)
    opt_state = jax.jit(tx.init)(params)
    step_fn = make_sft_step(graphdef, model.cfg, tx, bias_gamma)
    rng = np.random.default_rng(seed)
    losses, n_tokens, t0 = [], 0, time.perf_counter()
    for s in range(steps):
        tokens, lengths, mask = answer_batch(tok, draw(rng, batch_size), seq_len)
        params, rest, opt_state, m = step_fn(params, rest, opt_state, jnp.asarray(tokens),
                                             jnp.asarray(lengths), jnp.asarray(mask))
        n_tokens += int(mask.sum())
        if (s + 1) % 10 == 0 or s + 1 == steps:
            losses.append(float(m["loss"]))
        if log is not None and ((s + 1) % log_every == 0 or s + 1 == steps):
            log(f"sft step {s + 1}/{steps}: loss {float(m['loss']):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return nnx.merge(graphdef, params, rest), losses, n_tokens
