"""Shared bits for benchmark scripts: machine description, fair timing, and result files.

Every timing is the median of at least `MIN_REPEATS` runs after `warmup` untimed runs, the
same statistic on both sides of a comparison; every result records the load average when the
benchmark started and when it wrote its results, and the torch thread count where torch is
used. `QUICK` (env MIMO_BENCH_QUICK=1, set by `run_all.sh --quick`) asks for small smoke-test
sizes; results then go to MIMO_BENCH_RESULTS (a scratch directory), never over the real ones.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

RESULTS = os.environ.get("MIMO_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__),
                                                               "results")
QUICK = os.environ.get("MIMO_BENCH_QUICK", "") not in ("", "0")
MIN_REPEATS = 5
_LOAD_AT_START = os.getloadavg()  # this module is imported when a benchmark starts


def malloc_setting() -> str:
    """This process's glibc malloc tuning (GLIBC_TUNABLES), as recorded in the results."""
    return os.environ.get("GLIBC_TUNABLES", "") or "glibc default"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def torch_threads() -> int | None:
    """torch's intra-op thread count, if this benchmark imported torch (else None)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def conditions() -> dict[str, object]:
    """What the machine was doing: load averages at start and now, torch threads."""
    return {"load_avg_start": [round(x, 2) for x in _LOAD_AT_START],
            "load_avg_end": load_average(), "torch_threads": torch_threads()}


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


def time_runs(fn: Callable[[], object], repeats: int = MIN_REPEATS, warmup: int = 1,
              setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of max(repeats, MIN_REPEATS) timed calls of `fn`, after `warmup`
    untimed ones. `setup` (untimed) runs before every call, warm-up included."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(max(repeats, MIN_REPEATS)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved_runs(fns: dict[str, Callable[[], object]], repeats: int = MIN_REPEATS,
                     warmup: int = 1, settle: int = 0) -> dict[str, list[float]]:
    """Seconds of max(repeats, MIN_REPEATS) timed calls of each function, taken in rounds
    (one timed call of each per round, the order rotating) after `warmup` untimed rounds.

    Sides compared this way see the same drift of a shared machine (its speed moves by 20-30%
    over minutes here), which timing one side after the other does not. `settle` untimed
    calls precede each timed one, so a side is not charged for its predecessor's leftovers
    (torch's OpenMP workers still spinning when a jax step starts, cold caches).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(repeats, MIN_REPEATS)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(settle):
                fns[name]()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


_CHILD = r"""
import importlib, json, os, sys
proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol pipe: ours alone
os.dup2(2, 1)  # what the sides print goes to stderr
sys.path.insert(0, sys.argv[1])
module, name = sys.argv[2].split(":")
sides, info = getattr(importlib.import_module(module), name)(**json.loads(sys.argv[3]))
proto.write(json.dumps({"sides": sorted(sides), "info": info}) + "\n")
for line in sys.stdin:
    try:
        sides[line.strip()]()
        proto.write("ok\n")
    except Exception as e:  # reported to the parent, which raises
        proto.write(json.dumps(repr(e)) + "\n")
"""


class ChildProcess:
    """Benchmark sides hosted in another Python process with its own environment: a baseline
    run as its users run it (e.g. glibc's default malloc, while ours uses huge pages; see
    mimo_jax.core.host_memory), yet timed in the same interleaved rounds as ours.

    `factory` ("module:function", importable from benchmarks/) is called there with `kwargs`
    (JSON) and returns ({side name: zero-argument callable}, info dict). `side(name)` is a
    local callable that runs that side once in the child and returns when it is done (a pipe
    round trip: well under a millisecond). Use as a context manager."""

    def __init__(self, factory: str, kwargs: dict, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, os.path.dirname(os.path.abspath(__file__)), factory,
             json.dumps(kwargs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env, bufsize=1)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"benchmark child {factory} exited before it was ready "
                               f"(code {self.proc.wait()}); see its stderr above")
        hello = json.loads(ready)
        self.sides: list[str] = hello["sides"]
        self.info: dict = hello["info"]

    def side(self, name: str) -> Callable[[], None]:
        if name not in self.sides:
            raise KeyError(f"child has no side {name!r} (it has {self.sides})")

        def run() -> None:
            self.proc.stdin.write(name + "\n")
            reply = self.proc.stdout.readline()
            if reply != "ok\n":
                raise RuntimeError(f"child side {name!r} failed: "
                                   f"{json.loads(reply) if reply else 'child exited'}")

        return run

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def median_seconds(fn: Callable[[], object], repeats: int = MIN_REPEATS, warmup: int = 1) -> float:
    """Median seconds of `fn` over max(repeats, MIN_REPEATS) runs after `warmup` runs."""
    return statistics.median(time_runs(fn, repeats, warmup))


def summary(times: list[float]) -> dict[str, float | int]:
    """Median, min, max and count of a list of run times (for the JSON results)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": len(times)}


def write_results(name: str, title: str, header: list[str], rows: list[list], extra: dict) -> str:
    """Print a markdown table and write it (plus JSON) to RESULTS/NAME.{md,json}, with the
    machine and the run's conditions (load averages, torch threads)."""
    info = {**machine(), **conditions()}
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
