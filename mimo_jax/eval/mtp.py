"""How well the MTP heads would speculate, teacher-forced on a corpus.

Definitions (positions t of one document, tokens x; 1-based draft index k = 1..K, head k is
`model.mtp[k-1]`; README "MTP input"):
- the main model's greedy prediction at t is g[t] = argmax p(. | x[..t]) (for token t+1);
- head k at t reads (h[t], x[t+k]) and drafts d_k[t] = argmax of its logits (for token t+k+1).
A K-head speculation *starting after t* is the decoding round in which x[..t] have hidden
states, x[t+1] is the pending token, and drafts d_1..d_K are verified by one main forward at
t+1..t+K. Teacher-forced: every token the heads and the verifier read is the corpus text
(in real decoding, the pending token and earlier drafts; they coincide whenever the text
is the main model's own greedy continuation, which the tests check against `generate`).
- draft k *matches* at t iff d_k[t] == g[t+k] (marginal acceptance rate: P(match k));
- draft k is *accepted* iff drafts 1..k all match (greedy verification accepts the longest
  matching prefix); conditional rate: P(accept k | accept k-1);
- acceptance length of a K-head round = 1 + accepted drafts (the verify forward always yields
  the main model's own token too, as the paper counts: at most K + 1);
- a start position t counts for K heads when t+1..t+K are in t's document (the drafts' inputs
  exist); rates of draft k use the positions that count for k heads.
- entropy: the main model's next-token entropy, in **nats**. Per start position the arrays
  give the mean entropy over the K verified positions t+1..t+K (the predictions the drafts
  are checked against); `mean_entropy` is the mean over all scored positions, the paper's x
  for a dataset (Fig. 7: y = 4 (1 - 0.58 x^0.58) with K = 3).

One jitted function of fixed shape [B, T] (packed rows as in `eval.perplexity`, padding rows
masked) computes main and head argmaxes and entropies with chunked logits; per-position
results (entropy, accepted drafts, matches) leave the device, never logits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.data.tokenizer import Tokenizer
from mimo_jax.eval.perplexity import (
    Batch,
    CompiledScorer,
    Corpus,
    as_tokenizer,
    output_weights,
    scoring_batches,
    token_statistics,
)
from mimo_jax.model.mimo import MiMo
from mimo_jax.train.loss import shifted_targets


def _shift(x_bt: jax.Array, k: int, fill) -> jax.Array:
    """x[:, t + k] at t (fill past the row's end)."""
    return jnp.pad(x_bt[:, k:], ((0, 0), (0, k)), constant_values=fill)


def _positions_stats(model: MiMo, batch, num_heads: int, chunk: int) -> dict[str, jax.Array]:
    ids_bt, seg_bt = batch["ids"], batch["segment_ids"]
    out = model(ids_bt, positions=batch["positions"], segment_ids=seg_bt,
                compute_mtp=True, compute_logits=False)
    b, t, d = out.hidden.shape
    k_heads = num_heads
    hidden_hbtd = jnp.concatenate([out.hidden[None], out.mtp_hidden[:k_heads]])
    # Targets: main -> token t+1, head k -> token t+k+1 (only for the accuracy vs the text).
    tgts, valids = zip(*(shifted_targets(ids_bt, seg_bt, 1 + j) for j in range(1 + k_heads)),
                       strict=True)
    tgt_hbt, valid_hbt = jnp.stack(tgts), jnp.stack(valids)
    nll_n, arg_n, ent_n = token_statistics(hidden_hbtd.reshape(-1, d), output_weights(model),
                                           tgt_hbt.reshape(-1), chunk)
    arg_hbt = arg_n.reshape(1 + k_heads, b, t)
    ent_bt = ent_n.reshape(1 + k_heads, b, t)[0]
    g_bt = arg_hbt[0]

    # in_doc[k-1]: t+k is in t's (non-padding) document, k = 1..K.
    in_doc_kbt = jnp.stack([(_shift(seg_bt, k, 0) == seg_bt) & (seg_bt != 0)
                            for k in range(1, k_heads + 1)])
    match_kbt = jnp.stack([(arg_hbt[k] == _shift(g_bt, k, -1)) for k in range(1, k_heads + 1)])
    match_kbt = match_kbt & in_doc_kbt
    accepted_bt = jnp.sum(jnp.cumprod(match_kbt.astype(jnp.int32), axis=0), axis=0)
    # K' <= K that count at t: t+1..t+K' all in t's document
    heads_bt = jnp.sum(jnp.cumprod(in_doc_kbt.astype(jnp.int32), axis=0), axis=0)
    ent_sum_bt = sum(_shift(ent_bt, k, 0.0) for k in range(1, k_heads + 1))
    correct_hbt = (arg_hbt == tgt_hbt) & (valid_hbt > 0)
    return {
        "entropy": ent_bt,  # next-token entropy at t
        "verify_entropy": ent_sum_bt / max(k_heads, 1),  # mean over t+1..t+K
        "accepted": accepted_bt.astype(jnp.int8),
        "heads": heads_bt.astype(jnp.int8),
        "matches": match_kbt,
        "scored": valid_hbt[0] > 0,  # positions with a next token in their document
        "correct": jnp.sum(correct_hbt, axis=(1, 2)),
        "targets": jnp.sum(valid_hbt, axis=(1, 2)),
        "nll_main": jnp.sum(nll_n.reshape(1 + k_heads, b, t)[0] * valid_hbt[0]),
    }


@dataclasses.dataclass(frozen=True)
class MTPAcceptance:
    """Teacher-forced MTP speculation statistics (see the module docstring for definitions).

    Index k-1 of the per-head arrays is draft k (head `model.mtp[k-1]`)."""

    num_heads: int  # K
    positions: int  # start positions that count for all K heads (the per-position arrays)
    marginal_rate: np.ndarray  # [K] P(d_k matches g[t+k])
    conditional_rate: np.ndarray  # [K] P(draft k accepted | drafts 1..k-1 accepted)
    acceptance_rate: np.ndarray  # [K] P(drafts 1..k all accepted)
    acceptance_length: np.ndarray  # [K] expected 1 + accepted drafts with K' = 1..K heads
    head_accuracy: np.ndarray  # [K] top-1 accuracy of head k against the text's token t+k+1
    main_accuracy: float  # top-1 accuracy of the main model against the text
    main_nll: float  # mean main-model NLL per scored token (nats)
    mean_entropy: float  # mean next-token entropy over positions with a next token (nats)
    entropy: np.ndarray  # [N] mean next-token entropy over t+1..t+K, nats
    accept_length: np.ndarray  # [N] 1 + accepted drafts of the K-head round after t
    matches: np.ndarray  # [N, K] bool: d_k[t] == g[t+k]
    tokens: int  # scored positions
    compilations: int
    seconds: float

    def save_npz(self, path: str) -> None:
        """Per-position arrays (entropy, accept_length, matches) and the summary, for a
        notebook: `np.load(path)`; the summary is a JSON string under "summary"."""
        import json

        np.savez_compressed(path, entropy=self.entropy, accept_length=self.accept_length,
                            matches=self.matches, summary=json.dumps(self.summary()))

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no per-position arrays)."""
        return {
            "num_heads": self.num_heads,
            "positions": self.positions,
            "marginal_rate": self.marginal_rate.tolist(),
            "conditional_rate": self.conditional_rate.tolist(),
            "acceptance_rate": self.acceptance_rate.tolist(),
            "acceptance_length": self.acceptance_length.tolist(),
            "head_accuracy": self.head_accuracy.tolist(),
            "main_accuracy": self.main_accuracy,
            "main_nll": self.main_nll,
            "mean_entropy_nats": self.mean_entropy,
            "tokens": self.tokens,
            "compilations": self.compilations,
            "seconds": self.seconds,
        }


def mtp_acceptance(
    model: MiMo,
    data: Corpus | str | Sequence[str] | Iterable[Batch],
    *,
    tokenizer: Tokenizer | Mapping[str, Any] | str | None = None,
    num_heads: int | None = None,
    seq_len: int = 1024,
    batch_size: int = 8,
    max_rows: int | None = None,
    logits_chunk: int = 4096,
) -> MTPAcceptance:
    """Teacher-forced acceptance of a K-head MTP speculation on `data` (arguments as in
    `eval.perplexity.perplexity`; `num_heads` defaults to all the model's heads)."""
    t0 = time.perf_counter()
    available = len(model.mtp)
    k_heads = available if num_heads is None else int(num_heads)
    if available == 0:
        raise ValueError("the model has no MTP heads (a checkpoint without model.mtp.* weights)")
    if not 1 <= k_heads <= available:
        raise ValueError(f"num_heads must be in 1..{available}, got {num_heads}")
    tok = as_tokenizer(tokenizer)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model vocabulary is "
            f"{model.cfg.vocab_size}: it is not the tokenizer this model was trained with"
        )
    seq_len = min(seq_len, model.cfg.max_position_embeddings)
    scorer = CompiledScorer(model, _positions_stats, (k_heads, logits_chunk))

    per_pos: dict[str, list[np.ndarray]] = {
        k: [] for k in ("entropy", "verify_entropy", "accepted", "heads", "matches", "scored")
    }
    correct = np.zeros(1 + k_heads)
    targets = np.zeros(1 + k_heads)
    nll = 0.0

    def collect(out, n_real: int) -> None:
        nonlocal correct, targets, nll
        out = jax.device_get(out)
        for key in per_pos:
            x = np.asarray(out[key])
            per_pos[key].append(x[:, :n_real] if key == "matches" else x[:n_real])
        correct = correct + np.asarray(out["correct"], np.float64)
        targets = targets + np.asarray(out["targets"], np.float64)
        nll += float(out["nll_main"])

    pending = None
    for batch, n_real in scoring_batches(data, tok, seq_len=seq_len, batch_size=batch_size,
                                         max_rows=max_rows):
        out = scorer(batch)
        if pending is not None:
            collect(*pending)
        pending = (out, n_real)
    if pending is not None:
        collect(*pending)
    if not per_pos["scored"]:
        raise ValueError("nothing to score: the data has no rows")

    scored = np.concatenate([x.reshape(-1) for x in per_pos["scored"]])
    heads = np.concatenate([x.reshape(-1) for x in per_pos["heads"]]).astype(np.int64)
    accepted = np.concatenate([x.reshape(-1) for x in per_pos["accepted"]]).astype(np.int64)
    matches = np.concatenate([x.reshape(k_heads, -1) for x in per_pos["matches"]], axis=1).T
    ent = np.concatenate([x.reshape(-1) for x in per_pos["entropy"]]).astype(np.float64)
    verify_ent = np.concatenate([x.reshape(-1) for x in per_pos["verify_entropy"]])

    marginal, conditional, rate, length = (np.full(k_heads, np.nan) for _ in range(4))
    for k in range(1, k_heads + 1):
        counts = heads >= k
        if not counts.any():
            continue
        marginal[k - 1] = matches[counts, k - 1].mean()
        rate[k - 1] = (accepted[counts] >= k).mean()
        prev = counts & (accepted >= k - 1)
        if prev.any():
            conditional[k - 1] = (accepted[prev] >= k).mean()
        length[k - 1] = 1.0 + np.minimum(accepted[counts], k).mean()
    full = heads >= k_heads
    n_tokens = int(scored.sum())
    return MTPAcceptance(
        num_heads=k_heads,
        positions=int(full.sum()),
        marginal_rate=marginal,
        conditional_rate=conditional,
        acceptance_rate=rate,
        acceptance_length=length,
        head_accuracy=correct[1:] / np.maximum(targets[1:], 1),
        main_accuracy=float(correct[0] / max(targets[0], 1)),
        main_nll=nll / max(float(targets[0]), 1.0),
        mean_entropy=float(ent[scored].mean()) if n_tokens else math.nan,
        entropy=verify_ent[full].astype(np.float32),
        accept_length=(1 + accepted[full]).astype(np.int32),
        matches=matches[full].astype(bool),
        tokens=n_tokens,
        compilations=scorer.compilations,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- the curve
def acceptance_curve(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """The paper's form y = a (1 - b x^c) (Fig. 7: a = 4, b = c = 0.58, x = entropy)."""
    return a * (1.0 - b * np.power(np.maximum(x, 0.0), c))


def fit_acceptance_curve(
    entropy: np.ndarray, accept_len: np.ndarray, *, a: float | None = None
) -> tuple[float, float, float]:
    """Least-squares (a, b, c) of y = a (1 - b x^c) through (entropy, acceptance length)
    points (per position or per dataset). `a` fixed (e.g. K + 1, the paper's asymptote 4)
    fits b and c only. Uses scipy's `curve_fit` (scipy comes with jax)."""
    from scipy.optimize import curve_fit

    x = np.asarray(entropy, np.float64).reshape(-1)
    y = np.asarray(accept_len, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"entropy and accept_len differ in size: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y) & (x >= 0)
    x, y = x[keep], y[keep]
    n_free = 2 if a is not None else 3
    if x.size < n_free or np.ptp(x) == 0:
        raise ValueError(f"need at least {n_free} points with distinct entropies to fit")
    a0 = float(np.max(y)) if a is None else float(a)
    if a is None:
        (fa, fb, fc), _ = curve_fit(acceptance_curve, x, y, p0=(a0, 0.58, 0.58),
                                    bounds=([0.0, -np.inf, 1e-3], [np.inf, np.inf, 10.0]),
                                    maxfev=20000)
    else:
        (fb, fc), _ = curve_fit(lambda xx, bb, cc: acceptance_curve(xx, a0, bb, cc), x, y,
                                p0=(0.58, 0.58), bounds=([-np.inf, 1e-3], [np.inf, 10.0]),
                                maxfev=20000)
        fa = a0
    return float(fa), float(fb), float(fc)
