"""A small passkey-retrieval probe (to be swapped for `mimo_jax.eval.passkey` when it lands).

Each sample is `[BOS] "# pass key: 48213" filler... "# pass key: " 48213` at a total length of
`context` tokens, the filler being held-out text from the run's own corpus, so the key sits
`context` tokens before the question. Teacher-forced: the model reads the true answer's
earlier digits and must predict each next one.

- `accuracy`: top-1 accuracy over the answer tokens (chance ~ 0.1 for digits);
- `exact`: fraction of samples with every answer token right;
- `gain_bits`: mean log2 p(answer | this key in context) - log2 p(answer | another key in
  context) per answer token; > 0 only if the model retrieves the key from that far back.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KEY_DIGITS = 5


def _encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), np.int32)


def build_samples(tok, filler: np.ndarray, context: int, samples: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids [2*samples, context]: rows with the true key then rows with a decoy key,
    answer token ids [samples, A], index of the first answer token)."""
    rng = np.random.default_rng(seed)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    keys = rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, size=2 * samples)
    true_rows, decoy_rows, answers = [], [], []
    for i in range(samples):
        key, decoy = int(keys[2 * i]), int(keys[2 * i + 1])
        if decoy == key:
            decoy = key + 1 if key + 1 < 10**KEY_DIGITS else key - 1
        answer = _encode(tok, str(key))
        question = _encode(tok, "\n# pass key: ")
        head_true = np.concatenate([bos, _encode(tok, f"# pass key: {key}\n")]).astype(np.int32)
        head_decoy = np.concatenate([bos, _encode(tok, f"# pass key: {decoy}\n")]).astype(np.int32)
        n_fill = context - len(head_true) - len(question) - len(answer)
        if n_fill < 0 or len(head_true) != len(head_decoy):
            raise ValueError(f"passkey context {context} is too short for the key and question")
        start = int(rng.integers(0, max(len(filler) - n_fill, 1)))
        fill = np.resize(filler[start:start + n_fill], n_fill)
        tail = np.concatenate([fill, question, answer]).astype(np.int32)
        true_rows.append(np.concatenate([head_true, tail]))
        decoy_rows.append(np.concatenate([head_decoy, tail]))
        answers.append(answer)
    ids = np.stack(true_rows + decoy_rows).astype(np.int32)
    answers_sa = np.stack(answers)
    return ids, answers_sa, context - answers_sa.shape[1]


def _answer_logprobs(model, ids_bt: jax.Array, first: int, length: int) -> jax.Array:
    """log-softmax [B, length, V] at the positions predicting tokens first..first+length-1."""
    out = model(ids_bt, compute_mtp=False, compute_logits=False)
    h_bad = out.hidden[:, first - 1:first - 1 + length]
    return jax.nn.log_softmax(model.lm_logits(h_bad).astype(jnp.float32), axis=-1)


_answer_logprobs_jit = nnx.jit(_answer_logprobs, static_argnums=(2, 3))


def passkey(model, tok, filler: np.ndarray, contexts: list[int], *, samples: int = 32,
            seed: int = 0, batch: int = 16) -> dict[str, dict[str, float]]:
    """{str(context): {"accuracy", "exact", "gain_bits", "samples"}} for each context."""
    out: dict[str, dict[str, Any]] = {}
    for context in contexts:
        ids, answers, first = build_samples(tok, filler, int(context), samples, seed + context)
        length = answers.shape[1]
        logp = []
        for s in range(0, ids.shape[0], batch):
            chunk = ids[s:s + batch]
            pad = batch - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            lp = _answer_logprobs_jit(model, jnp.asarray(chunk), first, length)
            logp.append(np.asarray(jax.device_get(lp))[: batch - pad])
        logp_bav = np.concatenate(logp)
        true_sav, decoy_sav = logp_bav[:samples], logp_bav[samples:]
        picked_true = np.take_along_axis(true_sav, answers[..., None], -1)[..., 0]
        picked_decoy = np.take_along_axis(decoy_sav, answers[..., None], -1)[..., 0]
        right = true_sav.argmax(-1) == answers
        out[str(context)] = {
            "accuracy": float(right.mean()),
            "exact": float(right.all(-1).mean()),
            "gain_bits": float((picked_true - picked_decoy).mean() / math.log(2)),
            "samples": samples,
        }
    return out
