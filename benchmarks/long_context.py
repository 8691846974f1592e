"""Long context on a CPU: prefill cost 1K -> 32K by layer type, peak memory of a long prefill,
and passkey retrieval of a tiny model after the two-stage extension recipe.

    python benchmarks/long_context.py prefill   # (a) prefill time, hybrid 5:1 vs all-sliding
    python benchmarks/long_context.py memory    # peak RSS of a 16K / 32K prefill (subprocesses)
    python benchmarks/long_context.py passkey [--workdir DIR]  # (b) after each training stage

Each part updates its section of results/long_context.json and rewrites long_context.md.

(a) `mimo_jax.generate`'s chunked prefill (`prefill_chunk`, the engine generation uses; the
cache holds exactly prompt + 1 positions) of one random prompt of T tokens, on a small model
with the release's 5:1 layout (6 layers: global at 0, sliding 1-5, window 129 keys) and on the
same model with every layer sliding. The difference is the global layer's extra cost: its
cached attention reads the filled part of the cache for every chunk (O(T^2)), a sliding layer
a ring of 129 slots (O(T)). Both are timed in the same run (median of >= 5 after the compiling
call); an all-global variant, 6 global layers, up to 8K shows what the hybrid saves.

(b) A tiny MiMo (4 layers, global at 0 and 3) trained on synthetic passkey documents
(`mimo_jax.data.passkey_docs`, one episode per 512-token row) after a warm-up on copy
documents (random strings repeated, where copy heads form): stage 1 at 512 tokens (global
RoPE base 640K), stage 2 at 2048 (base 5M), the two-stage recipe of
experiments/long_context.py through `TrainConfig.stages`; then `mimo_jax.eval.passkey`
(depths 0 / 0.5 / 1, 20 keys each, teacher-forced greedy check and the key's log-probability)
at 256 .. 4096 tokens for the stage-1 checkpoint (its max length lifted), the stage-2
checkpoint and a control stage 2 that keeps the 640K base (`--no-control` skips it). One
command trains (resuming) and evaluates:

    python benchmarks/long_context.py passkey   # copy to 1000, stage 1 to 2000, 2 to 2100

Training options (--lr, --weight-decay, --copy-steps, --rotary, --layers, --tail-filler,
--short-steps/--short-seq; defaults in PASSKEY_DEFAULTS) change only sizes, layout and the
data/optimizer of ordinary pre-training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    MIN_REPEATS,
    QUICK,
    RESULTS,
    conditions,
    machine,
    summary,
)

NAME = "long_context"
LENGTHS = (1024, 2048) if QUICK else (1024, 2048, 4096, 8192, 16384, 32768)
ALL_GLOBAL_UP_TO = 2048 if QUICK else 8192


def bench_config(layout: str):
    """A small MiMo (tiny widths, 2 query heads per layer type, the release's 129-key window)
    with 6 layers: "hybrid" (global at 0, sliding 1-5: 5:1), "sliding" or "global"."""
    from mimo_jax import ModelConfig
    from mimo_jax.model.config import AttentionSpec

    types = {"hybrid": ("full",) + ("sliding",) * 5, "sliding": ("sliding",) * 6,
             "global": ("full",) * 6}[layout]
    return ModelConfig.tiny(
        num_layers=6, layer_types=types, max_position_embeddings=65536,
        full_attention=AttentionSpec(2, 1, 32, 24, 5_000_000.0, 0.25, False, None),
        sliding_attention=AttentionSpec(2, 1, 32, 24, 10_000.0, 0.25, True, 129),
        num_mtp_layers=0)


# ------------------------------------------------------------------------------- results
def _load() -> dict:
    path = os.path.join(RESULTS, f"{NAME}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(section: str, data: dict) -> None:
    out = _load()
    out[section] = {**data, "machine": machine(), "conditions": conditions(),
                    "command": " ".join([sys.executable, *sys.argv])}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{NAME}.json"), "w") as f:
        json.dump(out, f, indent=1)
    text = render(out)
    with open(os.path.join(RESULTS, f"{NAME}.md"), "w") as f:
        f.write(text)
    print(text)


def _cond(sec: dict) -> str:
    c, m = sec["conditions"], sec["machine"]
    return (f"{m['date']}, {m['cpu']} x {m['nproc']}, jax {m['jax']}; load average "
            f"{c['load_avg_start']} at start, {c['load_avg_end']} at end; `{sec['command']}`")


def _f(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"  # nan


def render(out: dict) -> str:
    lines = ["# Long context on CPU", ""]
    if "prefill" in out:
        p = out["prefill"]
        lines += ["## (a) Prefill cost by layer type", "", _cond(p), "",
                  p["setup"], "",
                  "| prompt | hybrid 5:1 (s) | all-sliding (s) | global layer's extra (s) | "
                  "extra share of hybrid | all-global (s) | all-global / hybrid | "
                  "load (1 min) before / after |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            g = r.get("all_global")
            load = (f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"
                    if "load_before" in r else "")
            lines.append(
                f"| {r['length']} | {r['hybrid']['median_s']:.3f} | "
                f"{r['sliding']['median_s']:.3f} | {r['global_extra_s']:.3f} | "
                f"{r['global_share']:.0%} | "
                + (f"{g['median_s']:.3f} | {g['median_s'] / r['hybrid']['median_s']:.2f}x |"
                   if g else "not measured | |") + f" {load} |")
        lines += ["", f"Growth exponents (log-log least-squares slope, {p['fit_from']} tokens "
                  "and longer): " + ", ".join(f"{k} {_f(v)}" for k, v in p["exponents"].items()),
                  ""]
        if p.get("per_doubling"):
            names = [k for k in p["per_doubling"][0] if k not in ("from", "to")]
            lines += ["Local exponents between consecutive lengths (log2 of the time ratio per "
                      "doubling):", "", "| from -> to | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            for d in p["per_doubling"]:
                lines.append(f"| {d['from']} -> {d['to']} | "
                             + " | ".join(_f(d[k]) for k in names) + " |")
            lines.append("")
        lines += [p["reading"], ""]
    if "memory" in out:
        m = out["memory"]
        lines += ["## Peak memory of a long prefill", "", _cond(m), "", m["setup"], "",
                  "| prompt | peak RSS (GiB) | prefill (s) | [T, T] f32 scores of one global "
                  "layer's heads (GiB) |", "|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['length']} | {r['peak_rss_gib']:.2f} | {r['prefill_s']:.1f} | "
                         f"{r['tt_scores_gib']:.1f} |")
        lines += ["", m["reading"], ""]
    if "passkey" in out:
        k = out["passkey"]
        lines += ["## (b) Passkey retrieval after the extension recipe", "", _cond(k), "",
                  k["setup"], "",
                  "| checkpoint | " + " | ".join(f"{n} tok: acc / key log-prob"
                                               for n in k["lengths"]) + " |",
                  "|---|" + "---|" * len(k["lengths"])]
        for r in k["rows"]:
            cells = [f"{r['accuracy'][str(n)]:.2f} / {r['key_logprob'][str(n)]:.1f}"
                     for n in k["lengths"]]
            lines.append(f"| {r['checkpoint']} | " + " | ".join(cells) + " |")
        depths = k.get("depths")
        if depths:
            lines += ["", "Accuracy by needle depth (0 = right after the intro, 1 = right "
                      "before the question):", "",
                      "| checkpoint | length | " + " | ".join(f"depth {d:g}" for d in depths)
                      + " |", "|---|---|" + "---|" * len(depths)]
            for r in k["rows"]:
                for n in k["lengths"]:
                    acc = {c["depth"]: c["accuracy"] for c in r["cells"] if c["length"] == n}
                    name = r["checkpoint"].split(":")[0]  # the run's label, step omitted
                    lines.append(f"| {name}, step {r['step']} | {n} | "
                                 + " | ".join(f"{acc[float(d)]:.2f}" for d in depths) + " |")
        if k.get("reading"):
            lines += ["", k["reading"]]
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- (a)
def prefill_times(layout: str, length: int, chunk: int) -> dict:
    import numpy as np
    from flax import nnx

    from mimo_jax.inference import generate
    from mimo_jax.model.mimo import MiMo

    model = MiMo(bench_config(layout), rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(length).integers(1, 500, length).tolist()

    def once() -> float:
        r = generate(model, [prompt], max_new_tokens=1, max_len=length + 1,
                     prefill_chunk_size=chunk)
        return r.prefill_seconds  # compile time is reported apart and excluded

    once()  # compiles the prefill and decode programs for this shape
    return summary([once() for _ in range(MIN_REPEATS)])


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) on log(x) (the growth exponent); nan if undefined."""
    import math

    pts = [(math.log(x), math.log(y)) for x, y in points if y > 0]
    if len(pts) < 2 or len(pts) < len(points):
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return (sum((x - mx) * (y - my) for x, y in pts)
            / sum((x - mx) ** 2 for x, _ in pts))


def run_prefill(chunk: int, lengths: tuple[int, ...] = LENGTHS,
                all_global_up_to: int = ALL_GLOBAL_UP_TO, fit_from: int = 4096) -> None:
    from benchmarks.common import load_average

    rows = []
    for n in lengths:
        r = {"length": n, "load_before": load_average(),
             "hybrid": prefill_times("hybrid", n, chunk),
             "sliding": prefill_times("sliding", n, chunk)}
        if n <= all_global_up_to:
            r["all_global"] = prefill_times("global", n, chunk)
        r["load_after"] = load_average()
        r["global_extra_s"] = r["hybrid"]["median_s"] - r["sliding"]["median_s"]
        r["global_share"] = r["global_extra_s"] / r["hybrid"]["median_s"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    finish_prefill(rows, chunk, fit_from)


def finish_prefill(rows: list[dict], chunk: int, fit_from: int, note: str = "") -> None:
    """Exponents, reading and the results files from the measured rows (also usable on the
    JSON rows a run printed, should it be stopped before the end)."""
    from pallas_kernels.decode.xla import CACHE_BLOCK

    def pts(key: str, lo: int = 0) -> list[tuple[float, float]]:
        return [(r["length"], r[key]["median_s"] if isinstance(r[key], dict) else r[key])
                for r in rows if r["length"] >= lo and key in r]

    exps = {"hybrid": _slope(pts("hybrid", fit_from)),
            "all-sliding": _slope(pts("sliding", fit_from)),
            "global layer's extra": _slope(pts("global_extra_s", fit_from)),
            "all-global": _slope(pts("all_global", fit_from))}
    # local exponents between consecutive lengths
    steps = []
    for i in range(1, len(rows)):
        d = {"from": rows[i - 1]["length"], "to": rows[i]["length"]}
        for key, name in (("hybrid", "hybrid"), ("sliding", "all-sliding"),
                          ("global_extra_s", "global layer's extra")):
            d[name] = _slope(pts(key)[i - 1:i + 1])
        steps.append(d)
    last, g_exp = rows[-1], exps["global layer's extra"]
    reading = (
        f"From {fit_from} to {last['length']} tokens the all-sliding model's prefill grows "
        f"with exponent {exps['all-sliding']:.2f} (1 = linear) and the one global layer's extra "
        f"time with {g_exp:.2f} (2 = quadratic); at {last['length']} "
        f"tokens that extra is {last['global_share']:.0%} of the hybrid prefill. Engine detail: "
        f"a global layer reads its cache in blocks of {CACHE_BLOCK} slots up to the filled "
        "length (`pallas_kernels.decode.xla.CACHE_BLOCK`; the Pallas kernels skip unfilled "
        f"blocks too), so a chunk at offset o scores under o + {CACHE_BLOCK} slots, near the "
        "causal minimum; a sliding layer scores its 129-slot ring plus the chunk itself.")
    setup = (f"Model: `bench_config` (6 layers, hidden 128, 2 query heads / 1 KV head per "
             f"type, window 129 keys, MoE of 8 experts top-2, float32); one prompt, chunk "
             f"{chunk}, cache = prompt + 1 slots; median of {MIN_REPEATS} timed prefills after "
             f"the compiling call, each model and length in turn. 'global layer's extra' = "
             f"hybrid - all-sliding: the cost of layer 0 being global instead of sliding; "
             f"the all-sliding model is the sliding part (6 sliding layers).{note}")
    _save("prefill", {"rows": rows, "chunk": chunk, "exponents": exps, "fit_from": fit_from,
                      "per_doubling": steps, "reading": reading, "setup": setup})


# ------------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import json, sys, time, numpy as np
from flax import nnx
import mimo_jax
from mimo_jax.inference import generate
from mimo_jax.model.mimo import MiMo
n, chunk = int(sys.argv[1]), int(sys.argv[2])
cfg = mimo_jax.ModelConfig.tiny(max_position_embeddings=65536)
model = MiMo(cfg, rngs=nnx.Rngs(0))
prompt = np.random.default_rng(0).integers(1, 500, n).tolist()
r = generate(model, [prompt], max_new_tokens=1, max_len=n + 1, prefill_chunk_size=chunk)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_rss_kib": hwm, "prefill_s": r.prefill_seconds,
                  "compile_s": r.compile_seconds}))
"""


def run_memory(lengths: list[int], chunk: int) -> None:
    from mimo_jax import ModelConfig

    cfg = ModelConfig.tiny()
    heads = cfg.full_attention.num_heads
    rows = []
    for n in lengths:
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(n), str(chunk)],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"length": n, "peak_rss_gib": res["peak_rss_kib"] / 2**20,
                     "prefill_s": res["prefill_s"], "compile_s": res["compile_s"],
                     "wall_s": time.time() - t0, "tt_scores_gib": n * n * 4 * heads / 2**30})
        print(json.dumps(rows[-1]), flush=True)
    reading = (
        "Peak resident memory of the whole process (parameters, XLA executables, the cache of "
        "prompt + 1 slots for 2 global layers and 6 rings of 65 slots, one chunk's scores "
        f"[chunk, cache] per layer) against one [T, T] float32 score matrix of the "
        f"{heads} global query heads, which a non-chunked attention would need per layer.")
    setup = (f"`ModelConfig.tiny()` (8 layers: global at 0 and 5, window 65 keys, float32), one "
             f"random prompt, `generate(..., max_new_tokens=1, prefill_chunk_size={chunk})` in "
             "a fresh process per length; VmHWM from /proc/self/status.")
    _save("memory", {"rows": rows, "chunk": chunk, "reading": reading, "setup": setup})


# ------------------------------------------------------------------------------- (b)
# A tiny MiMo trained to retrieve: 4 layers, global at 0 and 3 (sliding 1-2, window 65), so a
# global layer sits above sliding layers (retrieval by induction needs the previous token's
# identity in the keys, which a first-layer global attention does not have); no MTP head.
PASSKEY_MODEL = {"num_layers": 4, "layer_types": ["full", "sliding", "sliding", "full"],
                 "vocab_size": 259, "num_mtp_layers": 0}
# Training options of the passkey run (`passkey` subcommand flags; see passkey_setup).
PASSKEY_DEFAULTS = {"lr": 2e-3, "rotary": 1.0, "layers": "full,sliding,sliding,full",
                    "tail_filler": 1, "short_steps": 0, "short_seq": 256, "tokens": 2048,
                    "copy_steps": 1000, "weight_decay": 0.0}


def passkey_train_config(workdir: str, steps1: int, steps2: int, seq1: int = 512,
                         seq2: int = 2048, filler_text: float = 0.0,
                         stage2_base: float | None = None, **options):
    """Stage 1 at `seq1` tokens (global RoPE base 640K) on synthetic passkey documents, then
    stage 2 at `seq2` (base 5M, the report's recipe) on the same kind of documents at `seq2`
    (same tokens per step), each document exactly one packed row (mimo_jax.data.passkey_docs).

    `options` (PASSKEY_DEFAULTS): `lr` (stage 1's peak; stage 2 a tenth of it), `rotary`
    (partial_rotary_factor of both layer types: the hub config has one), `layers` (layer
    types, comma-separated), `tail_filler` (most filler sentences between the repeated
    questions of a document's tail), `tokens` (per step, all stages); `short_steps` > 0 puts a
    first stage of that many steps at `short_seq` tokens (shorter documents) before stage 1;
    `copy_steps` > 0 puts before everything a warm-up of that many steps on copy documents
    (`passkey_docs.copy_document`, random strings repeated) at `short_seq` tokens;
    `weight_decay` is AdamW's, all stages."""
    from experiments.long_context import BASE_32K, BASE_256K, BASE_SWA
    from mimo_jax.data.passkey_docs import write_copy_jsonl, write_jsonl
    from mimo_jax.train import TrainConfig

    unknown = set(options) - set(PASSKEY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown passkey options {sorted(unknown)}")
    o = {**PASSKEY_DEFAULTS, **options}
    if int(o["copy_steps"]) + int(o["short_steps"]) >= steps1:
        raise ValueError(f"copy_steps + short_steps ({o['copy_steps']} + {o['short_steps']}) "
                         f"must end before stage 1 does (step {steps1})")
    data = os.path.join(workdir, "data")
    tokens = int(o["tokens"])
    batch1, batch2 = max(1, tokens // seq1), max(1, tokens // seq2)
    kw = {"filler_text": filler_text, "tail": "qa", "text_docs": 0.1,
          "tail_filler": int(o["tail_filler"])}
    tag = "" if kw["tail_filler"] == 3 else f"-t{kw['tail_filler']}"

    def docs(seq: int, steps: int, batch: int, seed: int) -> str:
        # documents for one epoch of the stage (at least 400 / 40 steps' worth)
        n = (steps + 10) * batch * 51 // 50
        return write_jsonl(os.path.join(data, f"passkey-{seq}{tag}-{n}.jsonl"), n, seq - 2,
                           seed=seed, **kw)

    short = int(o["short_steps"])
    src1 = docs(seq1, max(steps1 - short - int(o["copy_steps"]), 400), batch1, 1)
    src2 = docs(seq2, max(steps2 - steps1, 40), batch2, 2)
    types = [t.strip() for t in str(o["layers"]).split(",")]
    rot = float(o["rotary"])
    model = {**PASSKEY_MODEL, "num_layers": len(types), "layer_types": types,
             "max_position_embeddings": seq1,
             "full_attention": {"rope_theta": BASE_32K, "partial_rotary_factor": rot},
             "sliding_attention": {"rope_theta": BASE_SWA, "partial_rotary_factor": rot}}
    lr = float(o["lr"])
    stage1 = {"steps": steps1, "batch_size": batch1, "seq_len": seq1, "data.source": src1}
    stage2 = {"steps": steps2, "batch_size": batch2, "seq_len": seq2, "lr": lr / 10,
              "end_lr": lr / 30, "warmup_steps": 0, "decay_steps": steps2 - steps1,
              "bias_gamma": 1e-5, "data.source": src2, "model.max_position_embeddings": seq2,
              "model.full_attention": {"rope_theta": stage2_base or BASE_256K}}
    sq = int(o["short_seq"])
    pre = []  # stages before stage 1, in order
    if int(o["copy_steps"]) > 0:
        n = (int(o["copy_steps"]) + 10) * max(1, tokens // sq) * 51 // 50
        pre.append({"steps": int(o["copy_steps"]), "batch_size": max(1, tokens // sq),
                    "seq_len": sq, "data.source": write_copy_jsonl(
                        os.path.join(data, f"copy-{sq}-{n}.jsonl"), n, sq - 2, seed=4)})
    if short > 0:  # shorter documents first (same tokens per step), then stage 1
        pre.append({"steps": int(o["copy_steps"]) + short, "batch_size": max(1, tokens // sq),
                    "seq_len": sq,
                    "data.source": docs(sq, max(short, 100), max(1, tokens // sq), 3)})
    first, stages = (pre[0], [*pre[1:], stage1, stage2]) if pre else (dict(stage1), [stage2])
    return TrainConfig.preset("tiny-cpu").override({
        **{f"model.{k}": v for k, v in model.items()},
        "data.val_fraction": 0.01, "data.val_batches": 2,
        **first, "lr": lr, "end_lr": lr / 10,
        "weight_decay": float(o["weight_decay"]),
        "warmup_steps": 20, "decay_steps": 0, "val_every": 10**6,
        "save_every": 250, "console_every": 25, "keep_checkpoints": 4,
        "progress_bar": False, "tensorboard": False, "stages": stages})


def _eval_checkpoint(workdir: str, step: int, tok, lengths: list[int], depths: list[float],
                     trials: int, label: str) -> dict:
    import dataclasses

    from flax import nnx

    from mimo_jax.eval.passkey import passkey_retrieval
    from mimo_jax.model.mimo import MiMo
    from mimo_jax.train import load_checkpoint

    model, meta = load_checkpoint(workdir, step)
    cfg = model.cfg
    if cfg.max_position_embeddings < max(lengths):  # evaluate beyond the trained length
        cfg = dataclasses.replace(cfg, max_position_embeddings=max(lengths))
        state = nnx.state(model)
        model = nnx.merge(nnx.graphdef(MiMo(cfg, rngs=nnx.Rngs(0))), state)
    t1 = time.time()
    res = passkey_retrieval(model, tok, lengths=lengths, depths=depths, trials=trials, seed=0)
    by_len = {}
    for n in lengths:
        cells = [r for r in res.rows if r["length"] == n]
        by_len[str(n)] = sum(r["mean_key_logprob"] for r in cells) / len(cells)
    mc = meta["model_config"]
    row = {"checkpoint": f"{label}: step {step}, trained at {meta['train_config']['seq_len']}, "
                         f"global base {mc['full_attention']['rope_theta']:.3g}",
           "step": step, "label": label, "workdir": workdir,
           "trained_at": meta["train_config"]["seq_len"],
           "global_base": mc["full_attention"]["rope_theta"],
           "accuracy": {str(k): v for k, v in res.accuracy_by_length.items()},
           "key_logprob": by_len, "cells": res.rows, "eval_seconds": time.time() - t1}
    print(label, json.dumps(row["accuracy"]), flush=True)
    return row


def _final_losses(workdir: str) -> dict:
    """Logged training and validation losses by step (metrics.jsonl), every 25th step."""
    out: dict = {"train": {}, "val": {}}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "loss" in rec and "step" in rec:
                    split = "val" if rec.get("split") == "val" else "train"
                    if split == "val" or rec["step"] % 25 == 0:
                        out[split][str(rec["step"])] = rec["loss"]
    return out


def passkey_setup(workdir: str, tc, trials: int, depths: list[float], train_s: dict,
                  control: bool, options: dict) -> str:
    stages = tc.stage_configs()
    stage1, stage2 = stages[-2], stages[-1]
    mc = stage1.model_config()
    types = mc.layer_types
    glob = [i for i, t in enumerate(types) if t == "full"]
    fa, sa = mc.full_attention, mc.sliding_attention
    o = {**PASSKEY_DEFAULTS, **options}
    # the stages before stage 1, in passkey_train_config's order: copy warm-up, shorter docs
    kinds = (["copy documents (random strings of 8-40 letters/digits repeated, "
              "`passkey_docs.copy_document`)"] * (int(o["copy_steps"]) > 0)
             + ["shorter passkey documents"] * (int(o["short_steps"]) > 0))
    pre, prev = [], 0
    for st, kind in zip(stages[:-2], kinds, strict=True):
        pre.append(f"steps {prev}-{st.steps} on {kind}, {st.batch_size} x {st.seq_len} "
                   "tokens per step, same lr")
        prev = st.steps
    short = f"Before stage 1: {'; '.join(pre)}. " if pre else ""
    return (
        f"Run directory {workdir}. Model: `ModelConfig.tiny` with {len(types)} layers (global "
        f"at {', '.join(map(str, glob))}, the others sliding with window {sa.window} and "
        f"sinks; {fa.num_heads} query / {fa.num_kv_heads} KV heads global, {sa.num_heads} / "
        f"{sa.num_kv_heads} sliding, head dim {fa.head_dim}, RoPE on "
        f"{fa.rotary_dim} of the {fa.head_dim} dims (partial_rotary_factor "
        f"{fa.partial_rotary_factor:g}, both types), MoE {mc.num_experts} experts "
        f"top-{mc.num_experts_per_tok}, hidden {mc.hidden_size}), no MTP head, byte "
        "tokenizer. Data (`mimo_jax.data.passkey_docs`, tail='qa', text_docs=0.1, "
        f"tail_filler={o['tail_filler']}): 90% "
        "of the documents are one passkey episode in the evaluation's template and filler "
        "(random 5-digit key, random needle depth, random episode length), followed by the "
        f"question asked and answered again after 0-{o['tail_filler']} filler sentences, "
        "repeatedly, until the document is full; 10% are plain standard-library text; every "
        "document is exactly one training row; the loss is the ordinary next-token loss on "
        f"every token. {short}"
        f"Stage 1: to step {stage1.steps}, {stage1.batch_size} x {stage1.seq_len} tokens per "
        f"step, lr {stage1.lr:g} constant after {stages[0].warmup_steps} warm-up steps "
        f"(AdamW weight decay {stage1.weight_decay:g}), "
        f"global RoPE base 640K. Stage 2 (the extension recipe of experiments/long_context.py): "
        f"+{stage2.steps - stage1.steps} steps of {stage2.batch_size} x {stage2.seq_len} "
        f"tokens, lr {stage2.lr:g} cosine to {stage2.end_lr:g}, global base 5M, resumed from "
        "stage 1's checkpoint"
        + ("; the control repeats stage 2 from the same checkpoint keeping base 640K"
           if control else "")
        + ". Training seconds in this invocation: "
        + ", ".join(f"{k} {v:.0f}" for k, v in train_s.items())
        + " (about 0 when the checkpoints existed). Evaluation: "
        f"`mimo_jax.eval.passkey.passkey_retrieval` at depths "
        f"{' / '.join(f'{d:g}' for d in depths)}, {trials} random keys per (length, depth) "
        f"({trials * len(depths)} per length), the same keys for every checkpoint; a trial "
        "succeeds when all 6 answer tokens (the space and 5 digits) are the greedy argmax "
        "(teacher-forced). A uniform guess of the 5 digits has log-prob 5 ln(1/10) = -11.5.")


def run_passkey(workdir: str, lengths: list[int], trials: int, depths: list[float],
                steps1: int, steps2: int, filler_text: float, control: bool,
                options: dict | None = None) -> None:
    import shutil

    from experiments.long_context import BASE_32K
    from mimo_jax.eval.tokenizer import spec_tokenizer
    from mimo_jax.train import train
    from mimo_jax.train.checkpointing import checkpoint_directory

    options = dict(options or {})
    tc = passkey_train_config(workdir, steps1, steps2, filler_text=filler_text, **options)
    stage1 = tc.stage_configs()[-2]
    t0 = time.time()
    result = train(tc, workdir)  # resumes; a no-op when the run is complete
    train_s = {"all stages": time.time() - t0}
    runs = [(workdir, stage1.steps, "stage 1 (no extension)"),
            (workdir, result.step, "stage 2, base 640K -> 5M (report)")]
    if control:  # the same stage 2 keeping the 640K base, from a copy of stage 1's checkpoint
        ctrl = workdir.rstrip("/") + "-base640k"
        src = os.path.join(checkpoint_directory(workdir), str(stage1.steps))
        dst = os.path.join(checkpoint_directory(ctrl), str(stage1.steps))
        if not os.path.exists(dst):
            shutil.copytree(src, dst)
        ctc = passkey_train_config(ctrl, steps1, steps2, filler_text=filler_text,
                                   stage2_base=BASE_32K, **options)
        t0 = time.time()
        cres = train(ctc, ctrl)
        train_s["control stage 2"] = time.time() - t0
        runs.append((ctrl, cres.step, "stage 2, base kept at 640K (control)"))
    tok = spec_tokenizer(tc.data.tokenizer)
    rows = [_eval_checkpoint(w, s, tok, lengths, depths, trials, label) for w, s, label in runs]
    setup = passkey_setup(workdir, tc, trials, depths, train_s, control, options)
    _save("passkey", {"rows": rows, "lengths": list(lengths), "trials": trials,
                      "depths": list(depths), "reading": "", "setup": setup,
                      "options": {**PASSKEY_DEFAULTS, **options},
                      "train_seconds": train_s,
                      "losses": {w: _final_losses(w) for w in {r[0] for r in runs}}})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("prefill")
    a.add_argument("--chunk", type=int, default=256)
    a.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    a.add_argument("--all-global-up-to", type=int, default=ALL_GLOBAL_UP_TO)
    a.add_argument("--fit-from", type=int, default=4096)
    m = sub.add_parser("memory")
    m.add_argument("--lengths", default="16384,32768")
    m.add_argument("--chunk", type=int, default=256)
    b = sub.add_parser("passkey")
    b.add_argument("--workdir", default="runs/tiny/long_context/passkey")
    b.add_argument("--lengths", default="256,512,1024,2048,4096")
    b.add_argument("--depths", default="0,0.5,1")
    b.add_argument("--trials", type=int, default=20)
    b.add_argument("--steps1", type=int, default=2000, help="stage 1 ends at this step")
    b.add_argument("--steps2", type=int, default=2100, help="stage 2 ends at this step")
    b.add_argument("--filler-text", type=float, default=0.0)
    b.add_argument("--lr", type=float, default=PASSKEY_DEFAULTS["lr"],
                   help="stage 1's peak lr (stage 2: a tenth)")
    b.add_argument("--rotary", type=float, default=PASSKEY_DEFAULTS["rotary"],
                   help="partial_rotary_factor of both layer types")
    b.add_argument("--layers", default=PASSKEY_DEFAULTS["layers"],
                   help="layer types, comma-separated (full / sliding)")
    b.add_argument("--tail-filler", type=int, default=PASSKEY_DEFAULTS["tail_filler"],
                   help="most filler sentences between a document's repeated questions")
    b.add_argument("--short-steps", type=int, default=PASSKEY_DEFAULTS["short_steps"],
                   help="a first stage of this many steps at --short-seq tokens (0: none)")
    b.add_argument("--short-seq", type=int, default=PASSKEY_DEFAULTS["short_seq"])
    b.add_argument("--copy-steps", type=int, default=PASSKEY_DEFAULTS["copy_steps"],
                   help="a warm-up of this many steps on copy documents first (0: none)")
    b.add_argument("--weight-decay", type=float, default=PASSKEY_DEFAULTS["weight_decay"])
    b.add_argument("--no-control", action="store_true",
                   help="skip the stage-2 control that keeps the 640K base")
    args = p.parse_args(argv)
    if args.part == "prefill":
        run_prefill(args.chunk, tuple(int(x) for x in args.lengths.split(",")),
                    args.all_global_up_to, args.fit_from)
    elif args.part == "memory":
        run_memory([int(x) for x in args.lengths.split(",")], args.chunk)
    else:
        run_passkey(args.workdir, [int(x) for x in args.lengths.split(",")], args.trials,
                    [float(x) for x in args.depths.split(",")], args.steps1, args.steps2,
                    args.filler_text, not args.no_control,
                    {k: getattr(args, k) for k in PASSKEY_DEFAULTS if hasattr(args, k)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
