"""Finds the declared sweeps: every module of the `experiments` package that defines `SWEEP`."""

from __future__ import annotations

import importlib
import pkgutil

from experiments.lib.spec import Experiment, ExperimentError, Sweep


def sweeps() -> dict[str, Sweep]:
    import experiments

    out: dict[str, Sweep] = {}
    for info in sorted(pkgutil.iter_modules(experiments.__path__), key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"experiments.{info.name}")
        sweep = getattr(module, "SWEEP", None)
        if isinstance(sweep, Sweep):
            if sweep.name in out:
                raise ExperimentError(f"two modules declare the sweep {sweep.name!r}")
            out[sweep.name] = sweep
    return out


def resolve(name: str) -> tuple[Sweep, list[Experiment]]:
    """A sweep name (all its experiments) or one experiment's full name."""
    all_sweeps = sweeps()
    if name in all_sweeps:
        return all_sweeps[name], list(all_sweeps[name].experiments)
    for sweep in all_sweeps.values():
        for e in sweep.experiments:
            if e.name == name:
                return sweep, [e]
    known = sorted(all_sweeps) + [e.name for s in all_sweeps.values() for e in s.experiments]
    raise ExperimentError(f"no experiment or sweep named {name!r}; have: {', '.join(known)}")
