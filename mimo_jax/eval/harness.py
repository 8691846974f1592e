"""Run lm-evaluation-harness tasks with the `mimo-jax` model and write the results.

    lm = MimoLM(pretrained="path/to/checkpoint")
    results = run_tasks(lm, ["mimo_offline", "my_task.yaml"], limit=50)
    write_results(results, "out/")   # out/results.json (lm-eval's dict) + out/results.md

Task names resolve against the offline tasks shipped in `mimo_jax/eval/tasks`, any
`include_path` folders, YAML files given by path, and (only when a name is not found there,
because indexing them takes seconds) lm-eval's own registry. Unknown names fail before
anything runs, with the closest known names.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from mimo_jax.eval.tasks import TASKS_DIR


class UnknownTaskError(ValueError):
    """A task name that no task folder, YAML file or lm-eval registry knows."""


def task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None = None
                 ) -> TaskManager:
    """A TaskManager that knows the shipped offline tasks, `include_path` and the folders of
    YAML files named in `tasks`; lm-eval's built-in tasks only if a name needs them.
    Raises `UnknownTaskError` for names none of them knows."""
    paths = [TASKS_DIR]
    if include_path:
        paths += [include_path] if isinstance(include_path, str) else list(include_path)
    for name in tasks:
        if name.endswith((".yaml", ".yml")):
            if not os.path.isfile(name):
                raise UnknownTaskError(f"task file {name} does not exist")
            paths.append(os.path.dirname(os.path.abspath(name)))
    local = _manager(tuple(paths), False)
    missing = [t for t in tasks if not _known(local, t)]
    if not missing:
        return local
    full = _manager(tuple(paths), True)
    missing = [t for t in tasks if not _known(full, t)]
    if missing:
        hints = {t: difflib.get_close_matches(t, full.all_tasks, n=3) for t in missing}
        raise UnknownTaskError(
            "unknown task(s): " + "; ".join(
                f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "")
                for t, h in hints.items())
            + ". Names: shipped offline tasks (mimo_offline, mimo_arith_mc, mimo_text_ppl, "
            "mimo_copy_words), lm-eval's registry (`lm_eval ls tasks`), or a YAML file path"
        )
    return full


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool) -> TaskManager:
    return TaskManager(include_path=list(paths), include_defaults=defaults)


def _known(manager: TaskManager, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and
                                         os.path.isfile(name))


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Sequence[str] | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    gen_kwargs: str | dict | None = None,
    manager: TaskManager | None = None,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on `lm` (a `MimoLM`); lm-eval's results dict, plus the
    backend's costs (compilations, padding fraction, seconds) under "mimo_jax".
    `manager`: a `task_manager(tasks)` already built (indexing lm-eval's tasks takes seconds)."""
    if not tasks:
        raise UnknownTaskError("no tasks given")
    manager = manager or task_manager(list(tasks), include_path)
    results = simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, gen_kwargs=gen_kwargs,
    )
    if results is None:  # not rank 0: lm-eval returns nothing
        return {}
    if hasattr(lm, "stats"):
        results["mimo_jax"] = lm.stats()
    return results


def markdown(results: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """lm-eval's tables (tasks, then groups) and the backend's costs, as markdown."""
    parts = []
    if results.get("results"):
        parts += ["## lm-eval tasks", "", make_table(results)]
        if results.get("groups"):
            parts += ["## Groups", "", make_table(results, "groups")]
    stats = results.get("mimo_jax") or {}
    scoring = stats.get("scoring")
    if scoring:
        parts += ["## mimo-jax backend", "",
                  "| requests | batches | compilations (by bucket) | padding | compile s | "
                  "run s |", "|---|---|---|---|---|---|",
                  f"| {scoring['requests']} | {scoring['batches']} | "
                  f"{scoring['compilations']} ({scoring['compilations_by_bucket']}) | "
                  f"{100 * scoring['padding_fraction']:.1f}% | {scoring['compile_seconds']} | "
                  f"{scoring['run_seconds']} |", ""]
        gen = stats.get("generation") or {}
        if gen.get("requests"):
            parts += [f"Generation: {gen['requests']} requests, {gen['new_tokens']} new tokens "
                      f"in {gen['rounds']} rounds, {gen['seconds']} s "
                      f"(compile {gen['compile_seconds']} s)", ""]
    for title, section in (extra or {}).items():
        parts += [f"## {title}", "", _section(section), ""]
    return "\n".join(parts).rstrip() + "\n"


def _section(section: Any) -> str:
    if isinstance(section, str):
        return section
    if isinstance(section, list) and section and isinstance(section[0], dict):
        keys = list(section[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in section]
        return "\n".join(lines)
    if isinstance(section, dict):
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in section.items()]
        return "\n".join(lines)
    return str(section)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def write_results(results: dict[str, Any], output_dir: str,
                  extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Write `results.json` (lm-eval's dict, samples split out into `samples_<task>.jsonl`,
    plus `extra` evals) and `results.md`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    results = dict(results)
    samples = results.pop("samples", None) or {}
    paths = {}
    for task, rows in samples.items():
        path = os.path.join(output_dir, f"samples_{task}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False))
                f.write("\n")
        paths[f"samples_{task}"] = path
    payload = {**results, **({"evals": extra} if extra else {})}
    paths["json"] = os.path.join(output_dir, "results.json")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    paths["markdown"] = os.path.join(output_dir, "results.md")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(results, extra))
    return paths
