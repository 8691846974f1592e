"""CPU grouped matmul: batched slots + loop (the default) vs the loop alone, per shape.

    .venv/bin/python benchmarks/moe_cpu_slots.py   # writes benchmarks/results/moe_cpu_slots.*

`pallas_kernels.ragged.cpu`: the default runs each group's first 1.25x-mean rows as one
batched matmul (all cores) when the loop's dots are small (``default_capacity``), else the
loop alone; the baseline is ``make_cpu_bucketed(capacity=0)``, the loop alone, which was the
implementation before the slots. Forward and forward+backward (dx, dw) of one grouped matmul,
float32, random group sizes (uniform routing); median of >= 7 runs after a warm-up, the two
sides interleaved per shape. The shapes: the ~50M benchmark model's expert projections in its
train step (1024 tokens x top-4) and forward (2048 tokens), the tiny-cpu preset, and two with
large per-group matmuls where the default keeps the loop. On those rows the two sides run the
same code, so their ratio shows this machine's noise.
"""

from __future__ import annotations

import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK, interleaved_runs, write_results  # noqa: E402

from pallas_kernels.ragged.cpu import (  # noqa: E402
    LARGE_DOT_MACS,
    default_block,
    default_capacity,
    make_cpu_bucketed,
)

# name -> (M rows = tokens x top-k, G experts, K, N)
SHAPES = {
    "~50M train step, gate/up": (4096, 32, 384, 320),
    "~50M train step, down": (4096, 32, 160, 384),
    "~50M forward, gate/up": (8192, 32, 384, 320),
    "~50M forward, down": (8192, 32, 160, 384),
    "64 experts": (4096, 64, 384, 320),
    "tiny-cpu, gate/up": (4096, 8, 128, 192),
    "release / 4, gate/up": (8192, 256, 1024, 1024),
    "32768 rows, 64 experts": (32768, 64, 512, 512),
}
QUICK_SHAPES = ("~50M train step, gate/up", "tiny-cpu, gate/up")
REPEATS = 7


def _sides(m: int, g: int, k: int, n: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((g, k, n)) * 0.05, jnp.float32)
    sizes = jnp.asarray(np.bincount(rng.integers(0, g, m), minlength=g), jnp.int32)
    fns = {}
    for side, impl in (("loop", make_cpu_bucketed(capacity=0)), ("default", make_cpu_bucketed())):
        def y(x, w, impl=impl):
            return impl(x, w, sizes, transpose_rhs=False, preferred_element_type=jnp.float32)

        fwd = jax.jit(y)
        bwd = jax.jit(jax.grad(lambda x, w, y=y: jnp.sum(y(x, w) ** 2), (0, 1)))
        fns[f"{side} fwd"] = lambda f=fwd: jax.block_until_ready(f(x, w))
        fns[f"{side} fwd+bwd"] = lambda f=bwd: jax.block_until_ready(f(x, w))
    return fns


def main() -> None:
    rows, ratios = [], {}
    for name, (m, g, k, n) in SHAPES.items():
        if QUICK and name not in QUICK_SHAPES:
            continue
        med = {side: statistics.median(t) * 1e3
               for side, t in interleaved_runs(_sides(m, g, k, n), REPEATS).items()}
        dot = default_block(m, g) * k * n
        c = default_capacity(m, g, k, n)
        speed = {p: med[f"loop {p}"] / med[f"default {p}"] for p in ("fwd", "fwd+bwd")}
        ratios[name] = round(speed["fwd+bwd"], 2)
        rows.append([name, f"{m}, {g}, {k}, {n}", f"{dot / 1e6:.1f}M",
                     f"slots ({c} per group)" if c else "loop",
                     f"{med['loop fwd']:.1f}", f"{med['default fwd']:.1f}", f"{speed['fwd']:.2f}x",
                     f"{med['loop fwd+bwd']:.1f}", f"{med['default fwd+bwd']:.1f}",
                     f"{speed['fwd+bwd']:.2f}x"])
    write_results(
        "moe_cpu_slots", "CPU grouped matmul: slots + loop (default) vs the loop alone",
        ["shape", "M, G, K, N", "loop dot (MACs)", "default", "loop fwd ms", "default fwd ms",
         "fwd speed-up", "loop fwd+bwd ms", "default fwd+bwd ms", "fwd+bwd speed-up"],
        rows,
        {"timing": f"median of {REPEATS} after a warm-up, sides interleaved",
         "rule": f"slots unless the mean group has < 32 rows or default_block x K x N >= "
                 f"{LARGE_DOT_MACS} multiply-adds",
         "fwd_bwd_speedup": ratios})


if __name__ == "__main__":
    main()
