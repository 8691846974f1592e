"""MoE expert computation on CPU: our grouped matmul vs ragged_dot, dense and the ideal.

    .venv/bin/python benchmarks/moe.py            # writes benchmarks/results/moe.{md,json}

Timed: ``expert_ffn`` (sort, grouped gate/up, SwiGLU, grouped down, weighted combine), forward
and forward+backward (grads of x, combine weights, gate_up, down). Routing ids come from a random
float32 sigmoid router + top-k and are computed outside the timed function. Baselines:
``ragged_dot`` = ``expert_ffn(implementation="reference")``; dense = every token through every
expert, then the weighted combine; ideal = one dense matmul chain with the same useful FLOPs,
[T*K, D] x [D, 2F] -> SwiGLU -> [T*K, F] x [F, D]. Times are the minimum over repeats after a
warm-up (compile excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mimo_jax.model.moe_dispatch import expert_ffn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _problem(t: int, e: int, k: int, d: int, f: int, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (t, d), jnp.float32)
    router = jax.random.normal(ks[1], (d, e), jnp.float32) / d**0.5
    scores = jax.nn.sigmoid(x @ router)
    weights, ids = jax.lax.top_k(scores, k)
    gate_up = jax.random.normal(ks[2], (e, d, f, 2), jnp.float32) / d**0.5
    down = jax.random.normal(ks[3], (e, f, d), jnp.float32) / f**0.5
    ct = jax.random.normal(ks[4], (t, d), jnp.float32)
    return x, ids.astype(jnp.int32), weights, gate_up, down, ct


def _fns(k: int, e: int):
    def sparse(impl):
        return lambda x, ids, w, gu, dn: expert_ffn(x, ids, w, gu, dn, implementation=impl).y_td

    def dense(x, ids, w, gu, dn):
        combine_te = jnp.sum(jax.nn.one_hot(ids, e) * w[..., None], axis=1)
        h = jnp.einsum("td,edfc->tefc", x, gu)
        y_ted = jnp.einsum("tef,efd->ted", jax.nn.silu(h[..., 0]) * h[..., 1], dn)
        return jnp.einsum("ted,te->td", y_ted, combine_te)

    def ideal(x, ids, w, gu, dn):  # same useful FLOPs, no routing: expert 0 for every assignment
        x_md = jnp.repeat(x, k, axis=0)
        h = (x_md @ gu[0].reshape(x.shape[1], -1)).reshape(x_md.shape[0], -1, 2)
        y_md = (jax.nn.silu(h[..., 0]) * h[..., 1]) @ dn[0]
        return jnp.sum(y_md.reshape(x.shape[0], k, -1) * w[..., None], axis=1)

    return {"ours (cpu_bucketed)": sparse("cpu_bucketed"), "ragged_dot": sparse("reference"),
            "dense all-experts": dense, "ideal dense chain": ideal}


def _fwd_bwd(fn, ct):
    def loss(x, ids, w, gu, dn):
        return jnp.sum(fn(x, ids, w, gu, dn) * ct)

    return jax.grad(loss, argnums=(0, 2, 3, 4))


def run_config(name, t, e, k, d, f, *, methods, repeats, bwd=True):
    x, ids, w, gu, dn, ct = _problem(t, e, k, d, f)
    fns = _fns(k, e)
    rows = []
    for method in methods:
        fwd = _time(jax.jit(fns[method]), x, ids, w, gu, dn, repeats=repeats)
        fb = _time(jax.jit(_fwd_bwd(fns[method], ct)), x, ids, w, gu, dn, repeats=repeats) if (
            bwd) else None
        rows.append(dict(config=name, tokens=t, experts=e, top_k=k, d=d, f=f, method=method,
                         fwd_s=fwd, fwd_bwd_s=fb))
        fb_txt = f"{fb:8.4f}" if fb is not None else "       -"
        print(f"{name:10s} T={t:5d} E={e:3d} k={k} d={d:4d} f={f:4d}  {method:20s} "
              f"fwd {fwd:8.4f} s  fwd+bwd {fb_txt} s", flush=True)
    return rows


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def _ratio(rows, config, method, ref, key):
    get = {(r["config"], r["method"]): r for r in rows}
    a, b = get.get((config, method)), get.get((config, ref))
    if not a or not b or a[key] is None or b[key] is None:
        return None
    return b[key] / a[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    all_methods = ["ours (cpu_bucketed)", "ragged_dot", "dense all-experts", "ideal dense chain"]
    rows = []
    rows += run_config("spec", 4096, 64, 8, 512, 256, methods=all_methods, repeats=args.repeats)
    # MiMo-V2-Flash is d 4096, moe f 2048, 256 experts, top-8; here d and f / 4, T 1024.
    # ragged_dot would take minutes here (dense over 256 groups): forward only, one repeat.
    mimo = dict(t=1024, e=256, k=8, d=1024, f=512)
    rows += run_config("mimo/4", **mimo, methods=["ours (cpu_bucketed)", "dense all-experts",
                                                  "ideal dense chain"], repeats=args.repeats)
    rows += run_config("mimo/4", **mimo, methods=["ragged_dot"], repeats=1, bwd=False)
    for e in (32, 64, 128):
        rows += run_config("sweep", 4096, e, 8, 512, 256, methods=["ours (cpu_bucketed)"],
                           repeats=args.repeats)

    goals = {
        "speedup_vs_ragged_dot_fwd (goal >= 20)": _ratio(rows, "spec", "ours (cpu_bucketed)",
                                                         "ragged_dot", "fwd_s"),
        "speedup_vs_ragged_dot_fwd_bwd (goal >= 20)": _ratio(
            rows, "spec", "ours (cpu_bucketed)", "ragged_dot", "fwd_bwd_s"),
        "mimo/4 speedup_vs_ragged_dot_fwd": _ratio(rows, "mimo/4", "ours (cpu_bucketed)",
                                                   "ragged_dot", "fwd_s"),
    }
    for cfg in ("spec", "mimo/4"):
        for key in ("fwd_s", "fwd_bwd_s"):
            r = _ratio(rows, cfg, "ideal dense chain", "ours (cpu_bucketed)", key)
            goals[f"{cfg} ours/ideal {key} (goal <= 2)"] = r
    sweep = [r["fwd_bwd_s"] for r in rows if r["config"] == "sweep"]
    goals["sweep max/min fwd_bwd over 32/64/128 experts (goal ~1)"] = max(sweep) / min(sweep)

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "cpu": _cpu_model(), "jax": jax.__version__,
        "backend": jax.default_backend(), "loadavg_at_end": os.getloadavg(),
        "repeats": args.repeats,
    }
    print(json.dumps(goals, indent=1))
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals},
                                                 indent=1) + "\n")
    lines = [
        "# MoE expert computation on CPU (`benchmarks/moe.py`)", "",
        f"{meta['date']}, {meta['nproc']} x {meta['cpu']}, jax {meta['jax']}, "
        f"min of {args.repeats} after warm-up (ragged_dot at mimo/4: forward, one run). "
        f"Load average at the end: {', '.join(f'{v:.1f}' for v in meta['loadavg_at_end'])}.",
        "", "| config | T | E | k | d | f | method | fwd s | fwd+bwd s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fb = f"{r['fwd_bwd_s']:.4f}" if r["fwd_bwd_s"] is not None else "-"
        lines.append(f"| {r['config']} | {r['tokens']} | {r['experts']} | {r['top_k']} | {r['d']} "
                     f"| {r['f']} | {r['method']} | {r['fwd_s']:.4f} | {fb} |")
    lines += ["", "| goal | measured |", "|---|---|"]
    lines += [f"| {g} | {v:.2f} |" if v is not None else f"| {g} | - |" for g, v in goals.items()]
    (RESULTS / "moe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
