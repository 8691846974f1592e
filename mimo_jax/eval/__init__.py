"""Evaluation: perplexity / bits per byte and teacher-forced MTP acceptance on any corpus the
training pipeline reads (jitted once per fixed batch shape); packed fixed-shape scoring,
passkey retrieval, and the `mimo-jax` model for lm-evaluation-harness (registered on import
when `lm-eval` is installed: `lm_eval.simple_evaluate(model="mimo-jax", ...)`)."""

from mimo_jax.eval.mtp import (
    MTPAcceptance,
    acceptance_curve,
    fit_acceptance_curve,
    mtp_acceptance,
)
from mimo_jax.eval.packing import Packing, Scorer, ScoreRequest, loglikelihood_request
from mimo_jax.eval.passkey import PasskeyResult, passkey_retrieval
from mimo_jax.eval.perplexity import Corpus, PerplexityResult, perplexity

try:  # the lm-eval model "mimo-jax" (optional extra: pip install 'mimo-jax[eval]')
    import lm_eval  # noqa: F401
except ImportError:
    pass
else:
    from mimo_jax.eval.lm_backend import MimoLM  # noqa: F401  (registers "mimo-jax")

__all__ = [
    "Corpus",
    "MTPAcceptance",
    "Packing",
    "PasskeyResult",
    "PerplexityResult",
    "ScoreRequest",
    "Scorer",
    "acceptance_curve",
    "fit_acceptance_curve",
    "loglikelihood_request",
    "mtp_acceptance",
    "passkey_retrieval",
    "perplexity",
]
