"""Datasets of the shipped offline tasks, built locally (lm-eval's `custom_dataset` hook).

lm-eval calls these with the task metadata as keyword arguments; they ignore it. Every
builder is deterministic, so scores are comparable between runs and machines.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_WORDS = ("apple river stone cloud green seven table light music paper garden window "
          "yellow silver morning winter bridge candle forest ocean").split()


def _dataset_dict(splits: dict[str, list[dict[str, Any]]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def _sum_question(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    right = a + b
    wrong = {right + 1, right - 1, right + 10, a * b, abs(a - b)} - {right}
    choices = [right, *rng.sample(sorted(wrong), 3)]
    rng.shuffle(choices)
    return {"question": f"What is {a} plus {b}?", "choices": [str(c) for c in choices],
            "label": choices.index(right)}


def arithmetic_choice(**_: Any):
    """`mimo_arith_mc`: 100 test and 20 few-shot sums with four numeric choices."""
    rng = random.Random(1234)
    return _dataset_dict({"train": [_sum_question(rng) for _ in range(20)],
                          "test": [_sum_question(rng) for _ in range(100)]})


def text_documents(**_: Any):
    """`mimo_text_ppl`: the paragraphs of the shipped `texts.jsonl`."""
    with open(os.path.join(_HERE, "texts.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return _dataset_dict({"test": docs})


def copy_words(**_: Any):
    """`mimo_copy_words`: repeat a list of 2-4 words (50 test, 10 few-shot)."""
    rng = random.Random(4321)

    def doc() -> dict[str, str]:
        return {"words": " ".join(rng.sample(_WORDS, rng.randint(2, 4)))}

    return _dataset_dict({"train": [doc() for _ in range(10)],
                          "test": [doc() for _ in range(50)]})
