"""MoE expert computation on CPU: our grouped matmul vs ragged_dot, dense and the ideal.

    .venv/bin/python benchmarks/moe.py            # writes benchmarks/results/moe.{md,json}

Timed: ``expert_ffn`` (sort, grouped gate/up, SwiGLU, grouped down, weighted combine), forward
and forward+backward (grads of x, combine weights, gate_up, down). Routing ids come from a random
float32 sigmoid router + top-k and are computed outside the timed function. The main figure is
ours against the ideal: one dense matmul chain with the same useful FLOPs, [T*K, D] x [D, 2F] ->
SwiGLU -> [T*K, F] x [F, D] (ratio ideal time / our time; 1.0 = routing costs nothing).
Other baselines: "XLA:CPU ragged_dot" = ``expert_ffn(implementation="reference")``, i.e.
``jax.lax.ragged_dot`` as XLA compiles it for CPU (a weak baseline there: it runs dense over the
groups); dense = every token through every expert, then the weighted combine. Times are the
median of >= 5 runs after a warm-up (compile excluded); load averages at start and end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICK, RESULTS, conditions, median_seconds  # noqa: E402

from mimo_jax.model.moe_dispatch import expert_ffn  # noqa: E402

RAGGED = "XLA:CPU ragged_dot"
IDEAL = "ideal dense chain"
OURS = "ours (cpu_bucketed)"


def _time(fn, *args, repeats: int) -> float:
    """Median of >= 5 runs after a warm-up run (which includes the compile)."""
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=1)


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

    return {OURS: sparse("cpu_bucketed"), RAGGED: sparse("reference"),
            "dense all-experts": dense, IDEAL: ideal}


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--mimo-ragged-dot", action="store_true",
                        help="also time XLA:CPU ragged_dot at mimo/4 (minutes per run)")
    args = parser.parse_args()
    all_methods = [OURS, RAGGED, "dense all-experts", IDEAL]
    spec = dict(t=512, e=16, k=4, d=128, f=64) if QUICK else dict(t=4096, e=64, k=8, d=512,
                                                                  f=256)
    # MiMo-V2-Flash is d 4096, moe f 2048, 256 experts, top-8; here d and f / 4, T 1024.
    mimo = dict(t=256, e=64, k=8, d=256, f=128) if QUICK else dict(t=1024, e=256, k=8, d=1024,
                                                                   f=512)
    rows = []
    rows += run_config("spec", **spec, methods=all_methods, repeats=args.repeats)
    rows += run_config("mimo/4", **mimo, methods=[OURS, "dense all-experts", IDEAL],
                       repeats=args.repeats)
    if args.mimo_ragged_dot:
        rows += run_config("mimo/4", **mimo, methods=[RAGGED], repeats=args.repeats, bwd=False)
    for e in (32, 64, 128):
        rows += run_config("sweep", spec["t"], e, spec["k"], spec["d"], spec["f"],
                           methods=[OURS], repeats=args.repeats)

    main_fig = {}
    for cfg in ("spec", "mimo/4"):
        for key in ("fwd_s", "fwd_bwd_s"):
            # ideal time / our time: the share of the ideal dense chain's speed we reach
            main_fig[f"{cfg} ideal/ours {key}"] = _ratio(rows, cfg, OURS, IDEAL, key)
    goals = {f"{cfg} ours/ideal {key} (goal <= 2)": _ratio(rows, cfg, IDEAL, OURS, key)
             for cfg in ("spec", "mimo/4") for key in ("fwd_s", "fwd_bwd_s")}
    goals.update({
        f"speedup_vs_{RAGGED}_fwd": _ratio(rows, "spec", OURS, RAGGED, "fwd_s"),
        f"speedup_vs_{RAGGED}_fwd_bwd": _ratio(rows, "spec", OURS, RAGGED, "fwd_bwd_s"),
        f"mimo/4 speedup_vs_{RAGGED}_fwd": _ratio(rows, "mimo/4", OURS, RAGGED, "fwd_s"),
    })
    sweep = [r["fwd_bwd_s"] for r in rows if r["config"] == "sweep"]
    goals["sweep max/min fwd_bwd over 32/64/128 experts (goal ~1)"] = max(sweep) / min(sweep)
    fb = main_fig["mimo/4 ideal/ours fwd_bwd_s"]
    headline = (f"{fb:.2f}x the speed of the ideal dense chain at mimo/4 (fwd+bwd); "
                f"{goals[f'speedup_vs_{RAGGED}_fwd_bwd']:.1f}x {RAGGED} (spec)")

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "cpu": _cpu_model(), "jax": jax.__version__,
        "backend": jax.default_backend(), **conditions(), "repeats": max(args.repeats, 5),
        "statistic": "median after a warm-up", "quick": QUICK,
    }
    print(json.dumps({"main": main_fig, **goals}, indent=1))
    if args.no_write:
        return
    os.makedirs(RESULTS, exist_ok=True)
    Path(RESULTS, "moe.json").write_text(json.dumps(
        {"meta": meta, "headline": headline, "main_vs_ideal": main_fig, "rows": rows,
         "goals": goals}, indent=1) + "\n")
    lines = [
        "# MoE expert computation on CPU (`benchmarks/moe.py`)", "",
        f"{meta['date']}, {meta['nproc']} x {meta['cpu']}, jax {meta['jax']}, "
        f"median of {meta['repeats']} after a warm-up. Load average at start "
        f"{meta['load_avg_start']}, at end {meta['load_avg_end']}.", "",
        f"**Main figure: {headline}.**", "",
        "| config | ideal time / our time (1.0 = routing is free) |", "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in main_fig.items() if v is not None]
    lines += ["", "| config | T | E | k | d | f | method | fwd s | fwd+bwd s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fb = f"{r['fwd_bwd_s']:.4f}" if r["fwd_bwd_s"] is not None else "-"
        lines.append(f"| {r['config']} | {r['tokens']} | {r['experts']} | {r['top_k']} | {r['d']} "
                     f"| {r['f']} | {r['method']} | {r['fwd_s']:.4f} | {fb} |")
    lines += ["", "| goal | measured |", "|---|---|"]
    lines += [f"| {g} | {v:.2f} |" if v is not None else f"| {g} | - |" for g, v in goals.items()]
    Path(RESULTS, "moe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
