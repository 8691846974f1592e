"""Compile every kernel at the release's shapes for TPU (libtpu, compile-only devices) and
lower it for GPU (Pallas -> Triton MLIR, verified), on a CPU host; print a table.

    JAX_PLATFORMS=cpu python tools/compile_checks.py [--tpu v5e,v5p,v6e] [--no-gpu] [--json F]

Needs the libtpu wheel for the TPU part (`pip install -e '.[test]' -c constraints.txt`).
The same checks, with memory budgets, run in CI: tests/kernels/test_compile_{tpu,gpu}.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.compile_check import (  # noqa: E402
    MemoryUse,
    compile_for_tpu,
    lower_for_gpu,
)
from pallas_kernels.release_shapes import ATTENTION_CASES, RAGGED_CASES  # noqa: E402

MIB = 1 << 20


def _cases():
    for case in ATTENTION_CASES:
        yield "attention", case
    for case in RAGGED_CASES:
        yield "ragged", case


def run_tpu(generations: list[str]) -> list[dict]:
    rows = []
    for gen in generations:
        for op, case in _cases():
            for direction in ("fwd", "bwd"):
                fn = case.forward("pallas_tpu") if direction == "fwd" else case.backward(
                    "pallas_tpu")
                t0 = time.perf_counter()
                row = dict(target=gen, op=op, case=case.name, direction=direction)
                try:
                    mem = MemoryUse.of(compile_for_tpu(fn, *case.args(), topology=gen))
                    row.update(ok=True, temp_mib=mem.temp / MIB, argument_mib=mem.argument / MIB,
                               output_mib=mem.output / MIB)
                except Exception as e:  # report and go on: the table shows every failure
                    row.update(ok=False, error=str(e)[:300])
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                _print(row)
    return rows


def run_gpu() -> list[dict]:
    rows = []
    for op, case in _cases():
        for direction in ("fwd", "bwd"):
            fn = case.forward("pallas_gpu") if direction == "fwd" else case.backward(
                "pallas_gpu")
            t0 = time.perf_counter()
            row = dict(target="cuda (Triton MLIR verify)", op=op, case=case.name,
                       direction=direction)
            try:
                kernels = lower_for_gpu(fn, *case.args())
                row.update(ok=True, kernels=[k.name for k in kernels])
            except Exception as e:
                row.update(ok=False, error=str(e)[:300])
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            _print(row)
    return rows


def _print(row: dict) -> None:
    what = f"{row['target']:<26}{row['op']:<10}{row['case']:<22}{row['direction']:<5}"
    if not row["ok"]:
        print(f"{what} FAILED {row['error']}", flush=True)
    elif "temp_mib" in row:
        print(f"{what} temp {row['temp_mib']:8.1f} MiB  args {row['argument_mib']:8.1f} MiB  "
              f"out {row['output_mib']:8.1f} MiB  {row['seconds']:5.1f} s", flush=True)
    else:
        print(f"{what} ok: {', '.join(row['kernels'])}  {row['seconds']:5.1f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpu", default="v5e,v5p,v6e", help="generations, comma-separated; '' none")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = run_tpu([g for g in args.tpu.split(",") if g])
    if not args.no_gpu:
        rows += run_gpu()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} compiled", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
