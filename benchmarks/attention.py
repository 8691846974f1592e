"""CPU benchmark: the banded XLA attention against the dense masked reference.

Sliding-window layer at MiMo head dims (q/k 192, v 128), window 128, heads scaled down to
8 q / 1 kv, batch 1, float32, sinks on. Times are medians after compilation. GFLOP/s counts only
the band's matmul FLOPs (what a perfect banded kernel must do), against the f32 matmul rate of
this machine measured in the same run.

    .venv/bin/python benchmarks/attention.py [--lengths 1024 2048 ...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import median_seconds, write_results  # noqa: E402

from pallas_kernels.attn.reference import reference_attention  # noqa: E402
from pallas_kernels.attn.xla_banded import xla_attention  # noqa: E402

WINDOW, HQ, HKV, DQK, DV = 128, 8, 1, 192, 128
DENSE_LIMIT_BYTES = 8 * 2**30  # this box has ~16 GiB free; others run beside it
DENSE_ARRAYS = {"fwd": 3, "fwd+bwd": 5}  # live [Hq, T, T] f32 arrays in the dense reference


def band_keys(t: int) -> int:
    """Sum over queries of the keys each one sees."""
    i = np.arange(t)
    return int(np.minimum(i + 1, WINDOW).sum())


def matmul_gflops(repeats: int) -> float:
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    return 2 * n**3 / median_seconds(lambda: f(a, a).block_until_ready(), repeats) / 1e9


def make_fns(impl):
    def fwd(q, k, v, sk):
        return impl(q, k, v, sinks=sk, window=WINDOW, q_segment_ids=None, kv_segment_ids=None,
                    q_offset=jnp.int32(0), scale=DQK**-0.5)

    def loss(q, k, v, sk, do):
        return jnp.sum(fwd(q, k, v, sk) * do)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def time_fn(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    peak = matmul_gflops(args.repeats)
    xla_fwd, xla_grad = make_fns(xla_attention)
    ref_fwd, ref_grad = make_fns(jax.jit(reference_attention, static_argnames=("window", "scale")))
    rows, times = [], {}
    for t in args.lengths:
        rng = np.random.default_rng(t)
        q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
                       ((1, t, HQ, DQK), (1, t, HKV, DQK), (1, t, HKV, DV), (1, t, HQ, DV)))
        sk = jnp.asarray(rng.standard_normal(HQ, np.float32))
        flops_fwd = 2 * HQ * band_keys(t) * (DQK + DV)
        flops_bwd = 2 * HQ * band_keys(t) * (4 * DQK + 3 * DV)  # fwd + recompute, dp, dv, dq, dk
        for mode, fn, ref, flops, extra in (("fwd", xla_fwd, ref_fwd, flops_fwd, ()),
                                             ("fwd+bwd", xla_grad, ref_grad, flops_bwd, (do,))):
            t_xla = time_fn(fn, (q, k, v, sk, *extra), args.repeats)
            times[(t, mode)] = t_xla
            if HQ * t * t * 4 * DENSE_ARRAYS[mode] <= DENSE_LIMIT_BYTES:
                t_ref = time_fn(ref, (q, k, v, sk, *extra), args.repeats)
                ref_ms, speedup = f"{1e3 * t_ref:.1f}", f"{t_ref / t_xla:.1f}x"
            else:
                ref_ms, speedup = "skipped (would not fit)", "-"
            gflops = flops / t_xla / 1e9
            rows.append([t, mode, f"{1e3 * t_xla:.1f}", ref_ms, speedup, f"{gflops:.1f}",
                         f"{100 * gflops / peak:.0f}%"])
            print(rows[-1], flush=True)
    extra = {"matmul f32 GFLOP/s (2048^3, same run)": f"{peak:.1f}",
             "shape": f"B=1, Hq={HQ}, Hkv={HKV}, Dqk={DQK}, Dv={DV}, window={WINDOW}, f32, sinks",
             "dense reference skipped when":
                 f"Hq * T^2 * 4 B * {DENSE_ARRAYS} > {DENSE_LIMIT_BYTES} B"}
    for mode in ("fwd", "fwd+bwd"):
        if (16384, mode) in times and (2048, mode) in times:
            ratio = times[(16384, mode)] / times[(2048, mode)]
            extra[f"goal t(16k)/t(2k) <= 10, {mode}"] = f"{ratio:.1f}"
    for row in rows:
        if row[0] == 8192 and row[4] != "-":
            extra[f"goal >= 10x faster than dense at 8k, {row[1]}"] = row[4]
    write_results("attention", "Banded XLA attention vs dense reference (CPU)",
                  ["T", "pass", "banded ms", "dense ms", "speed-up", "band GFLOP/s",
                   "of matmul peak"], rows, extra)


if __name__ == "__main__":
    main()
