"""The notebooks in experiments/notebooks, executed as a user would run them: each jupytext
percent-format `.py` file becomes a notebook, its tagged `parameters` cell is followed by an
injected cell (as papermill does) that selects the tiny preset, and a real Jupyter kernel
(ipykernel, registered here for this interpreter) runs every cell with headless matplotlib.

A notebook passes when no cell raises, it displayed at least one figure (image/png), and its
headline numbers (the `application/json` output of `notebook_support.report`) hold what the
notebook claims. The tiny checkpoint and compiled programs are cached in one temp folder for
the whole module, so the first notebook builds the checkpoint and the others reuse it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import jupytext  # the `test` extra installs these four (and ipykernel)
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "experiments" / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
KERNEL = "mimo-jax-notebook-test"
CELL_TIMEOUT_S = 900


def inject_parameters(nb, values: dict) -> None:
    """Insert a cell setting `values` right after the cell tagged "parameters"."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Injected by tests/test_notebooks.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def checks(nb) -> dict[str, dict]:
    found = {}
    for o in outputs(nb):
        payload = o.get("data", {}).get("application/json")
        if isinstance(payload, str):
            payload = json.loads(payload)
        if isinstance(payload, dict) and "check" in payload:
            found[payload["check"]] = payload
    return found


def figures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for this interpreter, and the environment every notebook kernel gets."""
    from ipykernel.kernelspec import install

    base = tmp_path_factory.mktemp("notebooks")
    install(kernel_name=KERNEL, display_name="mimo-jax (tests)", prefix=str(base))
    env = dict(os.environ)
    env.update({
        "MPLBACKEND": "Agg",
        # A developer's own cache is reused (set it to rerun quickly); CI starts empty.
        "MIMO_JAX_NOTEBOOK_CACHE": os.environ.get("MIMO_JAX_NOTEBOOK_CACHE")
        or str(base / "cache"),
        "JAX_PLATFORMS": "cpu",
        # One CPU device, as a user's machine has (conftest simulates 8 for the mesh tests).
        "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f),
    })
    with pytest.MonkeyPatch.context() as mp:  # the kernelspec is looked up in this process
        mp.setenv("JUPYTER_PATH", os.pathsep.join(
            p for p in (str(base / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p))
        yield env


def run_notebook(name: str, parameters: dict, env: dict | None = None
                 ) -> tuple[object, float, float]:
    """Execute one notebook; returns (executed notebook, wall seconds, kernel CPU seconds)."""
    nb = jupytext.read(NOTEBOOK_DIR / name)
    inject_parameters(nb, parameters)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0, cpu0 = time.perf_counter(), _children_cpu()
    client.execute(**({} if env is None else {"env": env}))
    return nb, time.perf_counter() - t0, _children_cpu() - cpu0


def _finite(*xs) -> bool:
    return all(isinstance(x, int | float) and math.isfinite(x) for x in xs)


def expect_convert(c: dict) -> None:
    r = c["convert_and_inspect"]
    assert r["round_trip_identical"] is True and r["tensors_compared"] > 10
    assert 0.0 < r["fp8_fraction"] < 1.0  # FP8 experts/attention, float norms/embeddings
    assert r["plan_params_gib"] > 0 and r["plan_devices"] >= 1
    assert r["parity_max_abs_err"] is not None and r["parity_max_abs_err"] < 1e-4


def expect_evaluate(c: dict) -> None:
    r = c["evaluate"]
    assert _finite(r["perplexity"], r["bits_per_byte"]) and r["perplexity"] > 1
    assert r["compilations"] == [1, 0]  # the second call reuses the executable
    assert set(r["tasks"]) >= {"mimo_arith_mc", "mimo_copy_words"}
    assert 0.0 <= r["tasks"]["mimo_arith_mc"]["acc"] <= 1.0
    assert r["lm_eval_repeat_compilations"] == 0


def expect_mtp(c: dict) -> None:
    r = c["mtp_acceptance"]
    assert _finite(*r["fit_abc"]) and _finite(*r["fit_bc_with_a"])
    assert r["positions"] > 100 and 1.0 <= r["mean_acceptance_length"] <= 4.0
    assert len(r["speedup"]) == len(r["k"]) and _finite(*r["speedup"])
    assert r["speedup"][0] == 1.0


def expect_sinks(c: dict) -> None:
    r = c["attention_sinks"]
    assert r["reconstruction_max_abs_err"] < 1e-4  # our probabilities are the model's
    assert r["sliding_layers"] and r["global_layers"]
    assert all(0.0 <= m <= 1.0 for m in r["sink_mass_per_layer"].values())
    assert _finite(r["kl_without_sinks"]) and r["kl_without_sinks"] > 0
    assert r["global_beyond_window_mass"] > 0 and r["sliding_beyond_window_mass"] == 0


def expect_compare(c: dict) -> None:
    r = c["compare_runs"]
    assert len(r["runs"]) >= 2
    for run in r["runs"]:
        assert run["steps"] > 0 and _finite(run["final_train_loss"])


EXPECT = {"01_convert_and_inspect.py": expect_convert, "02_evaluate.py": expect_evaluate,
          "03_mtp_acceptance.py": expect_mtp, "04_attention_sinks.py": expect_sinks,
          "05_compare_runs.py": expect_compare}


def test_every_notebook_has_parameters_and_an_expectation():
    assert set(NOTEBOOKS) == set(EXPECT), "a notebook without checks here (or a stale entry)"
    for name in NOTEBOOKS:
        nb = jupytext.read(NOTEBOOK_DIR / name)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{name}: want one cell tagged 'parameters'"
        for var in ("CHECKPOINT", "MESH", "TINY"):
            assert f"\n{var} = " in "\n" + params[0].source, f"{name}: no {var} parameter"
        # The .py file is the source of truth: a notebook round trip changes nothing.
        text = (NOTEBOOK_DIR / name).read_text()
        assert jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent") == text


def test_inject_parameters_follows_the_parameters_cell():
    nb = jupytext.reads("# %%\nimport os\n\n# %% tags=[\"parameters\"]\nTINY = False\n\n"
                        "# %%\nprint(TINY)\n", fmt="py:percent")
    inject_parameters(nb, {"TINY": True, "RUNS": ["a"]})
    assert [c.source.splitlines()[-1] for c in nb.cells] == [
        "import os", "TINY = False", "RUNS = ['a']", "print(TINY)"]


# The two longest notebooks (~90 s each on 2 cores) run in the slow target.
_SLOW_NOTEBOOKS = {"03_mtp_acceptance.py", "05_compare_runs.py"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_NOTEBOOKS else n for n in NOTEBOOKS])
def test_notebook_runs_on_the_tiny_preset(name, kernel_env, tmp_path):
    parameters = {"TINY": True, "OUTPUT_DIR": str(tmp_path / "out")}
    if name == "05_compare_runs.py":  # no run directories: the notebook trains two itself
        parameters["RUNS_ROOT"] = str(tmp_path / "runs")
    nb, wall, cpu = run_notebook(name, parameters, kernel_env)
    print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU (kernel)", file=sys.stderr)
    assert figures(nb) >= 1, f"{name} displayed no figure"
    found = checks(nb)
    assert found, f"{name} reported no results"
    EXPECT[name](found)
