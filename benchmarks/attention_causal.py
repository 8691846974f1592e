"""CPU benchmark: full causal XLA attention (the global layers), hidden blocks skipped or not.

`pallas_kernels.attn.xla_banded` runs a global (full causal) layer as an online softmax over
key chunks. With the query offset traced, a `lax.scan` meets every key chunk with every query
row, although causality hides about half of those pairs at T = S. With the offset known at
trace time (training, a prefill from position 0: the dispatcher passes it) the chunks are
unrolled and each meets only the rows that can see it. This times both on one global layer at
the release's head dims (q/k 192, v 128; 8 query heads on one KV head, no sinks), batch 1,
float32: forward and forward+backward, sides in interleaved rounds, median of >= 5 after a
warm-up call. The FLOP rate counts the causal triangle's matmul FLOPs only (what a perfect
kernel must do) against the f32 matmul rate measured in the same run.

    .venv/bin/python benchmarks/attention_causal.py [--lengths 1024 2048 ...] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from attention import matmul_gflops  # noqa: E402
from common import QUICK, interleaved_runs, load_average, write_results  # noqa: E402

from pallas_kernels.attn.reference import reference_attention  # noqa: E402
from pallas_kernels.attn.xla_banded import xla_attention  # noqa: E402

HQ, HKV, DQK, DV = 8, 1, 192, 128


def make_fns(static: bool):
    """(jitted forward, jitted gradient) of one full causal layer; `static`: the query offset
    (0) is known at trace time."""
    attn = functools.partial(xla_attention, sinks=None, window=None, q_segment_ids=None,
                             kv_segment_ids=None, scale=DQK**-0.5,
                             static_q_offset=0 if static else None)

    def fwd(q, k, v):
        return attn(q, k, v, q_offset=jnp.int32(0))

    def loss(q, k, v, do):
        return jnp.sum(fwd(q, k, v) * do)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[512, 1024] if QUICK else [1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    load_before = load_average()
    peak = matmul_gflops(args.repeats)
    sides = {"traced offset (scan, every row)": make_fns(False),
             "static offset (hidden rows skipped)": make_fns(True)}
    ref = jax.jit(reference_attention, static_argnames=("window", "scale"))
    rows, ratios = [], {}
    for t in args.lengths:
        rng = np.random.default_rng(t)
        q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
                       ((1, t, HQ, DQK), (1, t, HKV, DQK), (1, t, HKV, DV), (1, t, HQ, DV)))
        if t <= 2048:  # both sides against the dense masked reference, once per length
            want = ref(q, k, v, sinks=None, window=None, q_segment_ids=None,
                       kv_segment_ids=None, q_offset=jnp.int32(0), scale=DQK**-0.5)
            for fwd, _ in sides.values():
                np.testing.assert_allclose(fwd(q, k, v), want, atol=2e-5, rtol=2e-5)
        pairs = t * (t + 1) // 2
        for mode, i, extra, flops in (("fwd", 0, (), 2 * HQ * pairs * (DQK + DV)),
                                      ("fwd+bwd", 1, (do,), 2 * HQ * pairs * (4 * DQK + 3 * DV))):
            fns = {name: functools.partial(
                lambda f, a: jax.block_until_ready(f(*a)), fn[i], (q, k, v, *extra))
                for name, fn in sides.items()}
            times = {n: statistics.median(ts) for n, ts in
                     interleaved_runs(fns, args.repeats, warmup=1).items()}
            base, new = times.values()
            ratios[f"{t} {mode}"] = round(base / new, 3)
            for name, sec in times.items():
                gflops = flops / sec / 1e9
                rows.append([t, mode, name, f"{1e3 * sec:.1f}", f"{gflops:.1f}",
                             f"{100 * gflops / peak:.0f}%",
                             f"{base / sec:.2f}x"])
                print(rows[-1], flush=True)
    extra = {"speedup_static_vs_traced": ratios,
             "matmul f32 GFLOP/s (2048^3, same run)": f"{peak:.1f}",
             "shape": f"B=1, Hq={HQ}, Hkv={HKV}, Dqk={DQK}, Dv={DV}, full causal, f32, no sinks",
             "timing": f"median of {max(args.repeats, 5)} calls after one warm-up call, sides "
                       "interleaved",
             "load": {"before": load_before, "after": load_average()}}
    write_results("attention_causal",
                  "Full causal XLA attention: static offset (hidden rows skipped) vs traced "
                  "(CPU)", ["T", "pass", "side", "ms", "triangle GFLOP/s", "of matmul peak",
                            "vs traced"], rows, extra)


if __name__ == "__main__":
    main()
