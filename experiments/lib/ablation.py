"""What the report's ablations share: the model depth, one MTP head as in pre-training, the
evaluations, and a helper that expands variants x seeds into experiments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from experiments.lib import scales
from experiments.lib.spec import EvalSpec, Experiment, Scaled

SCALES = scales.STANDARD

# 4 layers: global at layer 0, sliding in 1-3 (the release's rule at this depth; what two shared
# CPU cores afford); pre-training's single MTP head with lambda 0.3 (report §3.2).
BASE = {"model.num_layers": 4, "model.num_mtp_layers": 1, "mtp_lambda": 0.3}

EVALS = (
    EvalSpec("perplexity"),
    # Contexts of 4x and 16x the reference window: 64 and 256 tokens on a CPU, 512 and 2048
    # on a pod; the key sits at the start, the question at the end.
    EvalSpec("passkey", {"contexts": (Scaled("window", 4), Scaled("window", 16)),
                         "samples": 48}),
)


def expand(sweep: str, description: str, variants: Mapping[str, Mapping[str, Any]],
           labels: Mapping[str, str], seeds: Sequence[int], *, base: Mapping[str, Any] = BASE,
           evals: tuple[EvalSpec, ...] = EVALS) -> tuple[Experiment, ...]:
    """One experiment per (variant, seed): name `sweep/variant/sSEED`. The seed changes the
    initialisation only: data order and the held-out split stay fixed, so every run is scored
    on the same validation documents."""
    out = []
    for key, train in variants.items():
        for seed in seeds:
            out.append(Experiment(
                name=f"{sweep}/{key}/s{seed}",
                description=f"{description}: {labels[key]}, seed {seed}",
                scales=SCALES,
                train={**base, **train, "seed": seed},
                evals=evals,
                labels={"variant": labels[key], "key": key, "seed": seed},
            ))
    return tuple(out)


def compare(rows: Mapping[str, Mapping[str, tuple]], better: str, worse: str, metric: str, *,
            lower_is_better: bool = True, noise: float = 0.0, no_worse: bool = False
            ) -> tuple[bool | None, str]:
    """Does `better` beat `worse` on `metric` as the report says (with `no_worse`: is it at
    least as good, up to the seeds' spread, for "matches or beats" / "does not hurt" claims)?
    Returns (agrees, or None if not measured or both within `noise` of 0, a phrase)."""
    a, b = rows.get(better, {}).get(metric), rows.get(worse, {}).get(metric)
    if a is None or b is None:
        return None, f"{metric}: {better} vs {worse} not measured"
    if noise and abs(a[0]) < noise and abs(b[0]) < noise:
        return None, (f"{metric} {better} {a[0]:.4f} vs {worse} {b[0]:.4f}: no signal (both "
                      f"within {noise:g} of 0), no direction")
    diff = (b[0] - a[0]) if lower_is_better else (a[0] - b[0])
    spread = max((a[1] or 0.0), (b[1] or 0.0))
    agrees = diff > (-spread if no_worse else 0.0)
    if no_worse:
        return agrees, (f"{metric} {better} {a[0]:.4f} vs {worse} {b[0]:.4f}: "
                        f"{'agrees' if agrees else 'disagrees'} (claim: no worse, up to the "
                        f"seed spread {spread:.4f})")
    strength = "" if spread == 0 else (" (beyond the seed spread)" if abs(diff) > spread
                                       else " (within the seed spread)")
    return agrees, (f"{metric} {better} {a[0]:.4f} vs {worse} {b[0]:.4f}: "
                    f"{'agrees' if agrees else 'disagrees'}{strength}")


def verdict_sentence(checks: list[tuple[bool | None, str]]) -> str:
    measured = [c for c in checks if c[0] is not None]
    n_ok = sum(1 for c in measured if c[0])
    head = (f"{n_ok} of {len(measured)} directions agree with the report"
            if measured else "nothing measured yet")
    return head + ": " + "; ".join(text for _, text in checks) + "."
