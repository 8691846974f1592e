"""The evaluations an experiment declares, run on the final parameters of its training run.

- perplexity: `mimo_jax.eval.perplexity` on the run's held-out split (validation loss in nats
  per token, perplexity, bits per byte);
- mtp: `mimo_jax.eval.mtp_acceptance`, teacher-forced: per head the rate at which draft k
  matches the main model's greedy token (marginal) and is accepted (all drafts up to k match),
  and the expected acceptance length with all heads;
- passkey: `experiments.lib.passkey` at contexts in units of the scale's window.
Each returns flat, JSON-able numbers; `summary_metrics` names the ones reports use.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from experiments.lib.spec import Experiment, Scale
from mimo_jax.train import TrainConfig

# Held-out rows scored by perplexity / MTP at each scale (enough to be stable, cheap on a CPU).
DEFAULT_ROWS = 64


def _corpus(tc: TrainConfig):
    from mimo_jax.eval import Corpus

    return Corpus.from_data_config(tc.data, split="val")


def eval_perplexity(model, tc: TrainConfig, options: dict[str, Any]) -> dict[str, Any]:
    from mimo_jax.eval import perplexity

    r = perplexity(model, _corpus(tc), tokenizer=tc.data.tokenizer, seq_len=tc.seq_len,
                   batch_size=options.get("batch_size", 8),
                   max_rows=options.get("rows", DEFAULT_ROWS))
    return {"val_loss": r.nll, "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte,
            "tokens": r.tokens}


def eval_mtp(model, tc: TrainConfig, options: dict[str, Any]) -> dict[str, Any]:
    from mimo_jax.eval import mtp_acceptance

    if not len(model.mtp):
        return {"error": "the model has no MTP heads"}
    r = mtp_acceptance(model, _corpus(tc), tokenizer=tc.data.tokenizer, seq_len=tc.seq_len,
                       batch_size=options.get("batch_size", 8),
                       max_rows=options.get("rows", DEFAULT_ROWS))
    out: dict[str, Any] = {"acceptance_length": float(r.acceptance_length[-1]),
                           "main_accuracy": r.main_accuracy, "mean_entropy": r.mean_entropy,
                           "positions": r.positions}
    for k in range(r.num_heads):
        out[f"mtp_match_{k + 1}"] = float(r.marginal_rate[k])
        out[f"mtp_acc_{k + 1}"] = float(r.acceptance_rate[k])
        out[f"head_accuracy_{k + 1}"] = float(r.head_accuracy[k])
    return out


def _filler_tokens(tc: TrainConfig, tok, want: int) -> np.ndarray:
    docs, indices = _corpus(tc).open()
    parts, n = [], 0
    for i in indices:
        ids = np.asarray(tok.encode(docs[i]), np.int32)
        parts.append(ids)
        n += len(ids)
        if n >= want:
            break
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def eval_passkey(model, tc: TrainConfig, options: dict[str, Any], scale: Scale
                 ) -> dict[str, Any]:
    from experiments.lib.passkey import passkey
    from mimo_jax.data import load_tokenizer

    tok = load_tokenizer(tc.data.tokenizer)
    contexts = [int(c) for c in options.get("contexts", (4 * scale.window, 16 * scale.window))]
    filler = _filler_tokens(tc, tok, 4 * max(contexts))
    res = passkey(model, tok, filler, contexts, samples=int(options.get("samples", 32)),
                  seed=int(options.get("seed", 1234)))
    out: dict[str, Any] = {}
    for ctx, r in res.items():
        mult = int(ctx) / scale.window
        tag = f"{mult:g}W"
        out[f"passkey@{tag}"] = r["accuracy"]
        out[f"passkey_exact@{tag}"] = r["exact"]
        out[f"passkey_gain@{tag}"] = r["gain_bits"]
        out[f"passkey_context@{tag}"] = int(ctx)
    return out


def run_evals(model, tc: TrainConfig, exp: Experiment, scale: Scale,
              log=print) -> dict[str, Any]:
    """Every declared evaluation; one that fails is recorded as an error, not fatal."""
    results: dict[str, Any] = {}
    for spec in exp.evals:
        options = exp.eval_options(spec, scale)
        t0 = time.perf_counter()
        try:
            if spec.kind == "perplexity":
                r = eval_perplexity(model, tc, options)
            elif spec.kind == "mtp":
                r = eval_mtp(model, tc, options)
            else:
                r = eval_passkey(model, tc, options, scale)
        except Exception as e:  # an eval bug must not lose the training run
            r = {"error": f"{type(e).__name__}: {e}"}
        r["seconds"] = time.perf_counter() - t0
        results[spec.kind] = _clean(r)
        log(f"eval {spec.kind}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return results


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()}


def summary_metrics(evals: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics a report table reads (every eval's numbers but its bookkeeping)."""
    out = {}
    for kind, r in evals.items():
        for k, v in r.items():
            if k not in ("seconds", "tokens", "positions", "error") and not isinstance(v, dict):
                out[k] = v
        if "error" in r:
            out[f"{kind}_error"] = r["error"]
    return out
