"""Passkey retrieval at growing context lengths (long-context sanity check).

A random 5-digit pass key is hidden at a relative depth of a long stretch of filler text, and
the model is asked for it at the end (Mohtashami & Jaggi, 2023). A trial succeeds when greedy
decoding would produce the key: every key token is the argmax after the prompt (teacher-forced,
so one scoring pass, no generation). The log-probability of the key is reported too, which
moves before accuracy does for a model that is learning to retrieve.

Prompts are built in tokens of the model's tokenizer to at most each target length; all trials
are packed and scored by `mimo_jax.eval.packing.Scorer`, one compiled program per bucket.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

from mimo_jax.eval.packing import Packing, Scorer, loglikelihood_request, parse_buckets
from mimo_jax.eval.tokenizer import EvalTokenizer
from mimo_jax.model.mimo import MiMo

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
    rows: list[dict[str, Any]]  # per (length, depth): trials, accuracy, mean key log-prob
    accuracy_by_length: dict[int, float]
    compilations: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows,
                "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length.items()},
                "compilations": self.compilations, "seconds": round(self.seconds, 3)}


def passkey_prompt(tokenizer: EvalTokenizer, length: int, depth: float,
                   key: str) -> tuple[list[int], list[int]]:
    """(context tokens, key tokens) with context + key at most `length` tokens and the key
    sentence at relative `depth` (0 = right after the intro, 1 = right before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def build(n: int) -> tuple[list[int], list[int]]:
        before = round(depth * n)
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION
        context = tokenizer.encode(text)
        whole = tokenizer.encode(text + " " + key)
        return context, whole[len(context):]

    per_filler = max(1, len(tokenizer.encode(FILLER * 8, False)) // 8)
    context, answer = build(0)
    if len(context) + len(answer) > length:
        raise ValueError(f"passkey length {length} is too short: the prompt without filler "
                         f"already has {len(context) + len(answer)} tokens")
    n = max(0, (length - len(context) - len(answer)) // per_filler)
    while n > 0:
        context, answer = build(n)
        if len(context) + len(answer) <= length:
            break
        n -= max(1, (len(context) + len(answer) - length) // per_filler)
    else:
        context, answer = build(0)
    return context, answer


def passkey_retrieval(
    model: MiMo | None,
    tokenizer: EvalTokenizer,
    *,
    lengths: Sequence[int] = (256, 512, 1024),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 2,
    seed: int = 0,
    scorer: Scorer | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
) -> PasskeyResult:
    """Retrieval accuracy and key log-probability per (length, depth), `trials` keys each.

    `scorer`: reuse a `Scorer` (e.g. an lm-eval model's `.scorer`, keeping its compiled
    programs); its longest bucket must hold max(lengths). Else one is built over `model`
    with buckets at the lengths."""
    if not lengths or trials < 1:
        raise ValueError("passkey needs at least one length and one trial")
    longest = max(int(n) for n in lengths)
    if scorer is None:
        if model is None:
            raise ValueError("passkey_retrieval needs a model or a scorer")
        if longest > model.cfg.max_position_embeddings:
            raise ValueError(f"length {longest} is beyond the model's max_position_embeddings "
                             f"({model.cfg.max_position_embeddings})")
        packing = Packing(parse_buckets(list(lengths), longest), batch_size, max_batch_tokens)
        scorer = Scorer(model, packing)
    elif scorer.packing.max_length < longest:
        raise ValueError(f"the scorer's max_length {scorer.packing.max_length} is shorter than "
                         f"the passkey length {longest}")
    t0, compiled0 = time.perf_counter(), scorer.stats.compilations
    rng = random.Random(seed)
    cells, requests = [], []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                context, answer = passkey_prompt(tokenizer, int(length), float(depth), key)
                requests.append(loglikelihood_request(context, answer, longest))
                cells.append((int(length), float(depth)))
    scores = scorer.score(requests)
    rows, by_length = [], {}
    for length in lengths:
        for depth in depths:
            mine = [s for c, s in zip(cells, scores, strict=True) if c == (int(length), depth)]
            rows.append({"length": int(length), "depth": float(depth), "trials": len(mine),
                         "accuracy": sum(g for _, g in mine) / len(mine),
                         "mean_key_logprob": sum(lp for lp, _ in mine) / len(mine)})
        mine = [r["accuracy"] for r in rows if r["length"] == int(length)]
        by_length[int(length)] = sum(mine) / len(mine)
    return PasskeyResult(rows, by_length, scorer.stats.compilations - compiled0,
                         time.perf_counter() - t0)
