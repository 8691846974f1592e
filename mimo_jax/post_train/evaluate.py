"""Greedy exact-match scores of a model on held-out prompts, through `mimo_jax.generate`."""

from __future__ import annotations

from typing import Any

from mimo_jax.inference.generate import generate
from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train.tasks import Task, decode_response, encode_prompt


def score(model: MiMo, task: Task, tok: Any, *, num_prompts: int, max_new_tokens: int,
          batch: int = 128) -> float:
    """Mean reward of greedy answers to the task's first `num_prompts` held-out prompts."""
    pairs = task.heldout(num_prompts)
    stops = [] if tok.eos_id is None else [int(tok.eos_id)]
    total = 0.0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        ids = [encode_prompt(tok, p) for p, _ in chunk]
        ids += [ids[0]] * (batch - len(ids)) if len(pairs) > batch else []  # one shape
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                       stop_tokens=stops)
        for (p, _), new in zip(chunk, out.tokens, strict=False):
            total += task.reward(p, decode_response(tok, new))
    return total / max(len(pairs), 1)
