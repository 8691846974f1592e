"""Prompt sources with verifiable rewards, one per domain.

A task yields (prompt, answer) text pairs from a `train` or `heldout` split (a fixed hash of
the prompt decides the split, so held-out prompts are never trained on) and scores a
response: 1.0 for an exact match of the answer, else 0.0. Built in:

- `mod_add`: "a+b=" -> (a + b) mod m, a, b in [0, max_operand) (default m = 100,
  max_operand = m); `terms` operands (default 2): "3+1+4=" -> "8" with terms = 3,
  max_operand = 10 (m = 100 never wraps: a plain sum of digits);
- `reverse`: "r:abcd=" -> "dcba", letters from `alphabet`, length in [min_len, max_len];
- `jsonl`: your own prompts: one {"prompt": ..., "answer": ...} per line (exact-match reward).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import numpy as np


class Task(Protocol):
    name: str

    def sample(self, rng: np.random.Generator, split: str) -> tuple[str, str]: ...

    def heldout(self, n: int) -> list[tuple[str, str]]: ...

    def reward(self, prompt: str, response: str) -> float: ...


def _is_heldout(prompt: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return h / 2**32 < fraction


class _ExactMatch:
    name = "task"
    heldout_fraction = 0.2

    def answer(self, prompt: str) -> str:
        raise NotImplementedError

    def draw(self, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, split: str) -> tuple[str, str]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        want = split == "heldout"
        for _ in range(10_000):
            p = self.draw(rng)
            if _is_heldout(p, self.heldout_fraction) == want:
                return p, self.answer(p)
        raise RuntimeError(f"task {self.name}: no {split} prompt found")

    def heldout(self, n: int) -> list[tuple[str, str]]:
        rng = np.random.default_rng(12345)
        return [self.sample(rng, "heldout") for _ in range(n)]

    def reward(self, prompt: str, response: str) -> float:
        return float(response.strip() == self.answer(prompt))


class ModAdd(_ExactMatch):
    name = "mod_add"

    def __init__(self, modulus: int = 100, max_operand: int | None = None,
                 terms: int = 2) -> None:
        if modulus < 2:
            raise ValueError(f"mod_add: modulus must be >= 2, got {modulus}")
        self.m = modulus
        self.top = modulus if max_operand is None else int(max_operand)
        if self.top < 1:
            raise ValueError(f"mod_add: max_operand must be >= 1, got {max_operand}")
        if terms < 2:
            raise ValueError(f"mod_add: terms must be >= 2, got {terms}")
        self.terms = int(terms)

    def draw(self, rng):
        return "+".join(str(x) for x in rng.integers(0, self.top, size=self.terms)) + "="

    def answer(self, prompt):
        return str(sum(int(x) for x in prompt[:-1].split("+")) % self.m)


class Reverse(_ExactMatch):
    name = "reverse"

    def __init__(self, alphabet: str = "abcdefgh", min_len: int = 3, max_len: int = 6) -> None:
        if not alphabet or not 1 <= min_len <= max_len:
            raise ValueError("reverse: need a non-empty alphabet and 1 <= min_len <= max_len")
        self.alphabet, self.lo, self.hi = alphabet, min_len, max_len

    def draw(self, rng):
        n = int(rng.integers(self.lo, self.hi + 1))
        return "r:" + "".join(rng.choice(list(self.alphabet), size=n)) + "="

    def answer(self, prompt):
        return prompt[2:-1][::-1]


class JsonlTask(_ExactMatch):
    name = "jsonl"

    def __init__(self, path: str) -> None:
        self.pairs: dict[str, str] = {}
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    rec = json.loads(line)
                    if "prompt" not in rec or "answer" not in rec:
                        raise ValueError(f"{path}:{i + 1}: need 'prompt' and 'answer' fields")
                    self.pairs[rec["prompt"]] = str(rec["answer"])
        if not self.pairs:
            raise ValueError(f"{path}: no prompts")
        self.prompts = sorted(self.pairs)

    def draw(self, rng):
        return self.prompts[int(rng.integers(len(self.prompts)))]

    def answer(self, prompt):
        return self.pairs[prompt]


TASKS = {"mod_add": ModAdd, "reverse": Reverse, "jsonl": JsonlTask}


def make_task(spec: dict[str, Any]) -> Task:
    """A task from {"kind": name, **its options}."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r}; have {sorted(TASKS)}")
    return TASKS[kind](**spec)


def encode_prompt(tok: Any, text: str) -> list[int]:
    """BOS (when the tokenizer has one) + the prompt's ids, as the training pipeline does."""
    ids = [int(t) for t in tok.encode(text)]
    return ([int(tok.bos_id)] if tok.bos_id is not None else []) + ids


def decode_response(tok: Any, ids: list[int]) -> str:
    """The response text, cut at the first EOS."""
    out = []
    for t in ids:
        if tok.eos_id is not None and int(t) == tok.eos_id:
            break
        out.append(int(t))
    return tok.decode(out)
