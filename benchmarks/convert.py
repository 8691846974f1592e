"""Benchmark: streaming hf-to-orbax on a synthetic release-layout FP8 checkpoint.

Builds >= 4 GB of FP8 safetensors in >= 4 shards with full-width MiMo-V2-Flash layers (hidden
4096, q/k 192, v 128, 64/4 and 64/8 heads, dense 16384, experts 2048; fewer experts and a
smaller vocabulary so that it fits), then in one run measures, each as the median of >= 5 runs
after a warm-up run, every run starting from files evicted from the page cache (fsync +
posix_fadvise(DONTNEED), no root needed):
- raw read: the same files read sequentially with a 64 MiB buffer, i.e. the disk's cold rate;
- the converter as a subprocess (whole command: start-up, validation, conversion, final
  fsync): wall time -> source GB/s, and its peak resident memory from wait4()'s rusage
  (ru_maxrss, includes everything it touched; the max over the runs);
- with --baseline-tree DIR, the converter of another source tree (e.g. a `git worktree` of an
  earlier commit) the same way in the same run, for a before/after ratio.
Goals: peak <= 1.5 x largest shard + 1 GiB; throughput >= 0.5 x raw read (keep-fp8),
>= 0.3 x (bf16). Load averages at start and end are recorded.
Usage: python benchmarks/convert.py [--experts 80] [--modes keep-fp8,bf16] [--dir /tmp/x]
       [--repeats 5] [--baseline-tree /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK, RESULTS, conditions, summary, time_runs  # noqa: E402

from mimo_jax.checkpoint import fp8  # noqa: E402
from mimo_jax.checkpoint.convert import QUANTIZED  # noqa: E402
from mimo_jax.checkpoint.hf_mapping import hf_shapes, tensor_maps  # noqa: E402
from mimo_jax.checkpoint.release import model_shapes  # noqa: E402
from mimo_jax.checkpoint.safetensors_io import DTYPES, ShardedWriter  # noqa: E402
from mimo_jax.model.config import ModelConfig  # noqa: E402

GiB = 1 << 30


def plan_release(cfg: ModelConfig) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    shapes = model_shapes(cfg)
    plan = []
    for m in tensor_maps(cfg):
        pshape = shapes[m.path][0][0 if m.block is None else 1:]
        for name, shape in zip(m.hf_names, hf_shapes(m.kind, pshape), strict=True):
            if QUANTIZED.match(name):
                plan.append((name, fp8.E4M3, shape))
                hit = re.match(r"^model\.layers\.(\d+)\.self_attn\.[kv]_proj", name)
                full = bool(hit) and cfg.layer_types[int(hit.group(1))] == "full"
                if full:
                    kb, vb = fp8.head_grid(4, 192, 128)
                    s = (4 * (kb if ".k_proj." in name else vb), shape[1] // 128)
                else:
                    s = fp8.scale_shape(*shape)
                plan.append((name + "_scale_inv", DTYPES["F32"], s))
            else:
                dt = DTYPES["F32"] if ".mlp.gate." in name else DTYPES["BF16"]
                plan.append((name, dt, shape))
    return plan


def build(directory: str, cfg: ModelConfig, shard_bytes: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=64 << 20, dtype=np.uint8)
    pool[(pool & 0x7F) == 0x7F] = 0x3F  # no NaN encodings
    plan = plan_release(cfg)
    writer = ShardedWriter(directory, plan, shard_bytes)
    for i, (name, dt, shape) in enumerate(plan):
        n = int(np.prod(shape)) * dt.itemsize
        start = (i * 7919 * 4096) % (len(pool) - min(n, len(pool) // 2))
        if dt == fp8.E4M3 or dt == DTYPES["BF16"]:
            reps = -(-n // (len(pool) - start))
            raw = np.tile(pool[start:], reps)[:n] if reps > 1 else pool[start : start + n]
            if dt == DTYPES["BF16"]:
                raw = raw.copy()
                raw[1::2] = (raw[1::2] & 0x3F) | 0x3C  # finite, small-ish bf16 values
            writer.write(name, raw.view(dt).reshape(shape))
        else:
            writer.write(name, rng.uniform(1e-4, 1e-2, size=shape).astype(np.float32))
    writer.close()
    hf = cfg.to_hf()
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                 "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.endswith(".safetensors"))


def evict(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_read(files: list[str]) -> float:
    """Seconds to read `files` once, sequentially (call `evict` first for a cold read)."""
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def run_converter(src: str, dst: str, mode: str, tree: str | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one `mimo-jax convert hf-to-orbax` subprocess, run
    from source tree `tree` (default: this checkout)."""
    flag = ["--keep-fp8"] if mode == "keep-fp8" else ["--dtype", mode]
    cmd = [sys.executable, "-m", "mimo_jax.commands.convert", "hf-to-orbax", src, dst,
           "--no-progress", *flag]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if tree is not None:
        env["PYTHONPATH"] = os.path.abspath(tree)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tree or os.getcwd(), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"converter failed: {cmd}")
    return wall, usage.ru_maxrss * 1024


def release_bytes() -> int:
    cfg = ModelConfig.flash()
    return sum(dt.itemsize * int(np.prod(s)) for _, dt, s in plan_release(cfg))


def time_converter(src: str, files: list[str], dst: str, mode: str, repeats: int,
                   tree: str | None) -> tuple[list[float], int, int]:
    """Wall times of `repeats` (>= 5) cold runs after a warm-up run, the peak RSS over all of
    them, and the output's size."""
    peaks, out_bytes = [], 0

    def setup() -> None:
        shutil.rmtree(dst, ignore_errors=True)
        evict(files)

    def once() -> None:
        nonlocal out_bytes
        _, peak = run_converter(src, dst, mode, tree)
        peaks.append(peak)
        out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst)
                        for f in fs)

    times = []

    def timed() -> None:  # the subprocess's own wall time, not the harness around it
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)

    time_runs(timed, repeats, warmup=1, setup=setup)
    shutil.rmtree(dst, ignore_errors=True)
    return times[1:], max(peaks), out_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/mimo_convert_bench")
    ap.add_argument("--experts", type=int, default=8 if QUICK else 80)
    ap.add_argument("--vocab", type=int, default=4096 if QUICK else 32768)
    ap.add_argument("--shard-gb", type=float, default=0.1 if QUICK else 1.1)
    ap.add_argument("--modes", default="keep-fp8,bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-tree", default=None,
                    help="another mimo-jax source tree to time the same way (before/after)")
    args = ap.parse_args()
    cfg = ModelConfig.flash(num_layers=3, num_experts=args.experts, vocab_size=args.vocab,
                            num_mtp_layers=0, layer_types=("full", "sliding", "sliding"))
    full = release_bytes()
    src = os.path.join(args.dir, "release")
    shutil.rmtree(args.dir, ignore_errors=True)
    trees = [("this tree", None)] + ([("baseline", args.baseline_tree)]
                                     if args.baseline_tree else [])
    try:
        t0 = time.perf_counter()
        files = build(src, cfg, int(args.shard_gb * GiB))
        sizes = [os.path.getsize(f) for f in files]
        total = sum(sizes)
        print(f"built {len(files)} shards, {total / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        raw_times: list[float] = []  # each read's own time (the first is the warm-up)
        time_runs(lambda: raw_times.append(raw_read(files)), args.repeats, warmup=1,
                  setup=lambda: evict(files))
        raw_times = raw_times[1:]
        raw = total / statistics.median(raw_times)
        print(f"raw cold read {raw / 1e9:.3f} GB/s", flush=True)
        rows = []
        for mode in args.modes.split(","):
            for label, tree in trees:
                times, peak, out_bytes = time_converter(
                    src, files, os.path.join(args.dir, f"out-{mode}"), mode, args.repeats, tree)
                wall = statistics.median(times)
                rows.append(dict(mode=mode, tree=label, wall_s=wall, times=summary(times),
                                 src_gbps=total / wall / 1e9, ratio_to_raw=total / wall / raw,
                                 peak_rss_gib=peak / GiB,
                                 peak_goal_gib=(1.5 * max(sizes) + GiB) / GiB,
                                 out_gb=out_bytes / 1e9))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    goals = {"keep-fp8": 0.5, "bf16": 0.3, "bfloat16": 0.3}
    head = (f"source: {len(sizes)} shards, {total / 1e9:.2f} GB, largest "
            f"{max(sizes) / GiB:.2f} GiB; raw cold read {raw / 1e9:.3f} GB/s (median of "
            f"{len(raw_times)} cold reads after a warm-up)")
    lines = ["| mode | converter | median wall s (min-max) | source GB/s | vs raw read | "
             "peak RSS GiB | peak goal GiB | output GB | full release (est. "
             f"{full / 1e9:.0f} GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal_ok = "ok" if r["peak_rss_gib"] <= r["peak_goal_gib"] else "MISSED"
        goal = goals.get(r["mode"])
        tp_ok = "" if goal is None else (" (ok)" if r["ratio_to_raw"] >= goal else
                                         f" (goal {goal}x: MISSED)")
        t = r["times"]
        lines.append(f"| {r['mode']} | {r['tree']} | {r['wall_s']:.1f} ({t['min_s']:.1f}-"
                     f"{t['max_s']:.1f}, n={t['runs']}) | {r['src_gbps']:.3f} | "
                     f"{r['ratio_to_raw']:.2f}x{tp_ok} | {r['peak_rss_gib']:.2f} ({goal_ok}) | "
                     f"{r['peak_goal_gib']:.2f} | {r['out_gb']:.2f} | "
                     f"{full / r['src_gbps'] / 1e9 / 3600:.2f} h |")
    speedups = {}
    for r in rows:
        base = next((b for b in rows if b["mode"] == r["mode"] and b["tree"] == "baseline"),
                    None)
        if base is not None and r["tree"] == "this tree":
            speedups[r["mode"]] = base["wall_s"] / r["wall_s"]
    print(head)
    print("\n".join(lines))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    import importlib.metadata

    import orbax.checkpoint

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), nproc=os.cpu_count(),
                cpu=cpu, python=platform.python_version(), numpy=np.__version__,
                orbax=orbax.checkpoint.__version__,
                tensorstore=importlib.metadata.version("tensorstore"),
                load_avg=os.getloadavg(), **conditions(), quick=QUICK,
                baseline_tree=args.baseline_tree)
    out = os.path.join(RESULTS, "convert")
    os.makedirs(RESULTS, exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, shards=sizes, raw_read_gbps=raw / 1e9,
                       raw_read=summary(raw_times), rows=rows, speedup_vs_baseline=speedups,
                       full_release_bytes=full), f, indent=2)
    before = "".join(f"- {m}: {x:.2f}x faster than the baseline tree in this run\n"
                     for m, x in speedups.items())
    with open(out + ".md", "w") as f:
        f.write(f"# convert benchmark ({meta['date']})\n\nmachine: {meta['nproc']} CPUs, "
                f"{meta['cpu']}, load avg at start {meta['load_avg_start']}, at end "
                f"{meta['load_avg_end']}; orbax {meta['orbax']}, tensorstore "
                f"{meta['tensorstore']}\n\n{head}\n\n" + "\n".join(lines) + "\n\n" + before +
                "\nMethod: see the docstring of benchmarks/convert.py. The projection scales "
                "wall time by the bytes of the full release's safetensors (FP8 layout computed "
                "from the flash config); peak memory does not grow with the model (bounded by "
                "the read-ahead budget and two TensorStore transactions).\n")


if __name__ == "__main__":
    main()
