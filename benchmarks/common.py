"""Shared bits for benchmark scripts: machine description, timing, and result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict[str, str | int]:
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "nproc": os.cpu_count() or 0, "jax": jax.__version__,
            "backend": jax.default_backend(), "python": platform.python_version()}


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(name: str, title: str, header: list[str], rows: list[list], extra: dict) -> str:
    """Print a markdown table and write it (plus JSON) to benchmarks/results/NAME.{md,json}."""
    info = machine()
    lines = [f"# {title}", "", " | ".join(f"{k}: {v}" for k, v in info.items()), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {k}: {v}" for k, v in extra.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({"machine": info, "header": header, "rows": rows, **extra}, f, indent=1)
    return text
