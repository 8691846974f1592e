"""`run`: train one declared experiment into its run directory, then evaluate it.

Re-running the same command resumes from the latest checkpoint (also after a preemption, and
on a different mesh: Orbax restores onto the new shardings); evaluations of a step that was
already evaluated are reused.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import sys
import time
from typing import Any

from experiments.lib import rundir
from experiments.lib.spec import Experiment, ExperimentError, Scale, check_memory

DEFAULT_ROOT = os.environ.get("MIMO_JAX_RUNS", "runs")


def run_dir_of(root: str, scale: Scale, exp: Experiment) -> str:
    return rundir.join(root, scale.name, exp.name)


def exact_command(argv: list[str] | None) -> str:
    argv = sys.argv if argv is None else argv
    return shlex.join([sys.executable, "-m", "experiments", *argv[1:]]) if argv else ""


def _check_devices(scale: Scale) -> None:
    import jax

    if not scale.is_tpu:
        return
    if jax.devices()[0].platform != "tpu":
        raise ExperimentError(
            f"scale {scale.name} is for TPU, but this machine has {jax.devices()[0].platform} "
            "devices; use --scale tiny here or `launch` it on a TPU VM")
    if jax.device_count() != scale.chips or jax.process_count() != scale.hosts:
        raise ExperimentError(
            f"scale {scale.name} wants {scale.chips} chips on {scale.hosts} hosts; this job has "
            f"{jax.device_count()} devices in {jax.process_count()} processes (did every worker "
            "start? see `launch`)")


def run_experiment(exp: Experiment, scale_name: str | None = None, *, sets: list[str] = (),
                   root: str = DEFAULT_ROOT, argv: list[str] | None = None,
                   local_dir: str | None = None, evaluate: bool = True, log=print
                   ) -> dict[str, Any]:
    """Train (resuming) and evaluate; returns the run's summary (also in summary.json)."""
    import jax

    from experiments.lib.evals import run_evals, summary_metrics
    from mimo_jax.train import train

    scale = exp.scale(scale_name)
    tc = exp.train_config(scale, list(sets))
    plan = check_memory(tc, scale)  # before anything is allocated
    _check_devices(scale)
    run_dir = run_dir_of(root, scale, exp)
    remote = rundir.is_remote(run_dir) or local_dir is not None
    workdir = (local_dir or rundir.local_workdir(run_dir)) if remote else run_dir
    primary = jax.process_index() == 0
    git = rundir.git_info()
    command = exact_command(argv)
    attempt = {"event": "start", "time": time.time(), "host": socket.gethostname(),
               "commit": git.get("commit"), "command": command, "sets": list(sets),
               "processes": jax.process_count(), "devices": jax.device_count(),
               "load_avg": os.getloadavg()}
    if primary:
        rundir.write_json(rundir.join(run_dir, "config.json"), {
            "experiment": exp.name, "description": exp.description, "labels": dict(exp.labels),
            "scale": dataclasses.asdict(scale), "sets": list(sets),
            "train_config": tc.to_dict(),
            "evals": [{"kind": e.kind, "options": exp.eval_options(e, scale)} for e in exp.evals],
            "memory_plan_gib": {k: v / 2**30 for k, v in dataclasses.asdict(plan).items()
                                if k not in ("devices", "replicated_fraction")},
        })
        rundir.write_json(rundir.join(run_dir, "git.json"), git)
        epath_cmd = rundir.join(run_dir, "command.txt")
        from etils import epath

        epath.Path(epath_cmd).write_text(command + "\n")
        rundir.append_jsonl(rundir.join(run_dir, "attempts.jsonl"), attempt)
    if remote:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "checkpoints.url"), "w") as f:
            f.write(rundir.join(run_dir, "checkpoints") + "\n")
        if primary:
            rundir.pull(run_dir, workdir)
    log(f"run {exp.name} at {scale.name} -> {run_dir}")
    cpu0, wall0 = time.process_time(), time.time()
    mirror = rundir.Mirror(workdir, run_dir) if remote and primary else None
    if mirror:
        mirror.__enter__()
    try:
        result = train(tc, workdir)
    finally:
        if mirror:
            mirror.__exit__(None, None, None)
    evals = rundir.read_json(rundir.join(run_dir, "eval.json")) or {}
    declared = [{"kind": e.kind, "options": exp.eval_options(e, scale)} for e in exp.evals]
    fresh = evals.get("step") == result.step and evals.get("declared") == _jsonable(declared)
    if evaluate and exp.evals and not fresh:
        if jax.process_count() > 1:
            log("evaluations run single-host: rerun this command on one host (or a CPU "
                "machine that reads the run directory) to evaluate")
        else:
            evals = {"step": result.step, "declared": _jsonable(declared),
                     "results": run_evals(result.model, tc, exp, scale, log=log)}
            if primary:
                rundir.write_json(rundir.join(run_dir, "eval.json"), evals)
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    end = {"event": "end", "time": time.time(), "host": socket.gethostname(),
           "start_step": result.start_step, "step": result.step, "stopped_by": result.stopped_by,
           "cpu_s": cpu, "wall_s": wall, "load_avg": os.getloadavg()}
    attempts = rundir.read_jsonl(rundir.join(run_dir, "attempts.jsonl")) + [end]
    summary = {
        "experiment": exp.name, "scale": scale.name, "labels": dict(exp.labels),
        "step": result.step, "steps": tc.total_steps, "tokens": _tokens(tc, result.step),
        "train_loss_last": result.losses[-1] if result.losses else None,
        "train_val_loss": result.val_loss,
        "cpu_s": sum(a.get("cpu_s", 0.0) for a in attempts if a.get("event") == "end"),
        "wall_s": sum(a.get("wall_s", 0.0) for a in attempts if a.get("event") == "end"),
        "attempts": sum(1 for a in attempts if a.get("event") == "end"),
        "commit": git.get("commit"), "dirty": git.get("dirty"),
        "metrics": summary_metrics(evals.get("results", {})),
    }
    if primary:
        rundir.append_jsonl(rundir.join(run_dir, "attempts.jsonl"), end)
        rundir.write_json(rundir.join(run_dir, "summary.json"), summary)
    log(f"done {exp.name}: step {result.step}, cpu {cpu:.0f} s, wall {wall:.0f} s")
    return summary


def _tokens(tc, step: int) -> int:
    """Tokens trained up to `step`, stage by stage (each has its own batch x length)."""
    total, start = 0, 0
    for stc in tc.stage_configs():
        total += max(min(step, stc.steps) - start, 0) * stc.batch_size * stc.seq_len
        start = stc.steps
    return total


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x, default=str))
