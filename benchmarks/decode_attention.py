"""Cached attention (`pallas_kernels.cached_attention`) on the current backend: agreement of
every runnable implementation with the reference, and time per call at the release's
per-device shapes (64 query heads; global layers: 4 KV heads, head dims 192 / 128, a long
global cache filled to `length`; sliding layers: 8 KV heads, a 129-slot ring, sinks).

    python benchmarks/decode_attention.py [--seq 32768] [--repeats 20]

On CPU only the XLA implementation is timed (Pallas runs interpreted there). Each
implementation and the reference (every score materialised) are timed the same way in the same
run: median of >= 5 jitted calls after a warm-up call; load averages at start and end are
recorded. Writes benchmarks/results/decode_attention_<backend>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK, RESULTS, conditions, time_runs  # noqa: E402

from pallas_kernels.decode import cached_attention  # noqa: E402


def inputs(b, t, hq, hkv, dqk, dv, s, length, *, ring, dtype, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    q_offset = np.full(b, length, np.int32)
    if ring:  # the ring holds the last s positions, slot = position % s
        pos = np.arange(length - s, length)
        cache_pos = np.broadcast_to(np.zeros(s, np.int32), (b, s)).copy()
        cache_pos[:, pos % s] = pos
        cache_length = np.full(b, s, np.int32)
    else:
        cache_pos = np.where(np.arange(s) < length, np.arange(s), -1).astype(np.int32)
        cache_pos = np.broadcast_to(cache_pos, (b, s)).copy()
        cache_length = np.full(b, length, np.int32)
    return dict(
        q=normal(b, t, hq, dqk), k_cache=normal(b, hkv, s, dqk), v_cache=normal(b, hkv, s, dv),
        cache_positions=jnp.asarray(cache_pos), k_new=normal(b, t, hkv, dqk),
        v_new=normal(b, t, hkv, dv),
        new_positions=jnp.asarray(length + np.arange(t)[None].repeat(b, 0), jnp.int32),
        q_offset=jnp.asarray(q_offset), cache_length=jnp.asarray(cache_length))


ARGS = ("q", "k_cache", "v_cache", "cache_positions", "k_new", "v_new", "new_positions")


@functools.partial(jax.jit, static_argnames=("impl", "window"))
def attend(d, sinks, *, impl, window):
    return cached_attention(*(d[k] for k in ARGS), q_offset=d["q_offset"],
                            cache_length=d["cache_length"], sinks=sinks, window=window,
                            implementation=impl)


def implementations() -> list[str]:
    backend = jax.default_backend()
    return ["xla"] + {"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(backend, [])


def run_case(name, b, t, s, length, *, ring, window, sinks, repeats, check_seq):
    hq, dqk, dv = 64, 192, 128
    hkv = 8 if ring else 4
    rows = []
    for impl in implementations():
        # Agreement on a smaller cache (the reference materialises every score).
        small_s = s if ring else check_seq
        small_len = length if ring else check_seq - 64
        kw = inputs(b, t, hq, hkv, dqk, dv, small_s, small_len, ring=ring, dtype=jnp.float32)
        sk = jnp.asarray(np.random.default_rng(1).standard_normal(hq), jnp.float32) if sinks \
            else None
        want = np.asarray(attend(kw, sk, impl="reference", window=window))
        got = np.asarray(attend(kw, sk, impl=impl, window=window))
        err = float(np.max(np.abs(got - want)))
        # Timing at the full size in bf16.
        kw = inputs(b, t, hq, hkv, dqk, dv, s, length, ring=ring, dtype=jnp.bfloat16)
        secs = {}
        for which in (impl, "reference"):
            fn = functools.partial(attend, kw, sk, impl=which, window=window)
            secs[which] = statistics.median(time_runs(lambda fn=fn: jax.block_until_ready(fn()),
                                                      repeats, warmup=1))
        sec = secs[impl]
        read = b * hkv * min(length, s) * (dqk + dv) * 2
        rows.append(dict(case=name, impl=impl, batch=b, queries=t, slots=s, length=length,
                         max_abs_err_f32=err, microseconds=sec * 1e6,
                         reference_microseconds=secs["reference"] * 1e6,
                         speedup_vs_reference=secs["reference"] / sec,
                         cache_gbytes_per_s=read / sec / 1e9))
        print(f"{name} B={b} T={t} {impl}: err {err:.2e}, {sec * 1e6:.0f} us "
              f"({secs['reference'] / sec:.2f}x the reference), "
              f"{read / sec / 1e9:.0f} GB/s of cache", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024 if QUICK else 32768,
                    help="global cache slots")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--check-seq", type=int, default=256 if QUICK else 1024)
    args = ap.parse_args()
    rows = []
    for b, t in ((1, 1), (1, 4), (8, 1), (8, 4)):
        rows += run_case("global", b, t, args.seq, args.seq - 768, ring=False, window=None,
                         sinks=False, repeats=args.repeats, check_seq=args.check_seq)
        rows += run_case("sliding", b, t, 129, 5000, ring=True, window=129, sinks=True,
                         repeats=args.repeats, check_seq=args.check_seq)
    backend = jax.default_backend()
    dev = jax.devices()[0].device_kind
    cond = conditions()
    md = [f"# Cached attention on {backend} ({dev}), jax {jax.__version__}", "",
          "64 query heads, head dims 192 / 128, bf16 cache; error: max |impl - reference| in "
          f"float32 (global check on {args.check_seq} slots); time: median of "
          f"{max(args.repeats, 5)} jitted calls after a warm-up, the reference timed the same "
          f"way in the same run. Load average at start {cond['load_avg_start']}, at end "
          f"{cond['load_avg_end']}.", "",
          "| layer | impl | batch | queries | cache slots | filled | error | us | reference us "
          "| vs reference | cache GB/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['impl']} | {r['batch']} | {r['queries']} | {r['slots']} | "
           f"{min(r['length'], r['slots'])} | {r['max_abs_err_f32']:.1e} | "
           f"{r['microseconds']:.0f} | {r['reference_microseconds']:.0f} | "
           f"{r['speedup_vs_reference']:.2f}x | {r['cache_gbytes_per_s']:.0f} |" for r in rows]
    glob = [r for r in rows if r["case"] == "global" and r["impl"] != "reference"]
    best = glob[-1]
    headline = (f"{best['impl']} {best['speedup_vs_reference']:.2f}x the reference, global "
                f"layer B={best['batch']} T={best['queries']}, {best['slots']} slots "
                f"({best['microseconds']:.0f} us)")
    text = "\n".join(md) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"decode_attention_{backend}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"decode_attention_{backend}.json"), "w") as f:
        json.dump({"backend": backend, "device": dev, "jax": jax.__version__, "rows": rows,
                   "headline": headline, "meta": {"date": datetime.datetime.now(
                       datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), **cond, "quick": QUICK}},
                  f, indent=1)


if __name__ == "__main__":
    main()
