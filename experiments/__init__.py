"""Declared experiments for mimo-jax: `python -m experiments list | show | run | launch | report`.

Each module of this package that defines `SWEEP` (a `Sweep`: a named list of `Experiment`s)
is an experiment; see experiments/README.md.
"""

from experiments.lib.registry import resolve, sweeps
from experiments.lib.spec import (
    EvalSpec,
    Experiment,
    ExperimentError,
    LayerPattern,
    Scale,
    Scaled,
    Sweep,
    check_memory,
)

__all__ = ["EvalSpec", "Experiment", "ExperimentError", "LayerPattern", "Scale", "Scaled",
           "Sweep", "check_memory", "resolve", "sweeps"]
