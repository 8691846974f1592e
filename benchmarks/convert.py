"""Benchmark: streaming hf-to-orbax on a synthetic release-layout FP8 checkpoint.

Builds >= 4 GB of FP8 safetensors in >= 4 shards with full-width MiMo-V2-Flash layers (hidden
4096, q/k 192, v 128, 64/4 and 64/8 heads, dense 16384, experts 2048; fewer experts and a
smaller vocabulary so that it fits), then in one run measures:
- raw read: the same files read sequentially with a 64 MiB buffer after evicting them from the
  page cache (fsync + posix_fadvise(DONTNEED), no root needed), i.e. the disk's cold read rate;
- the converter as a subprocess (files evicted again first): wall time -> source GB/s, and its
  peak resident memory from wait4()'s rusage (ru_maxrss, includes everything it touched).
Goals: peak <= 1.5 x largest shard + 1 GiB; throughput >= 0.5 x raw read.
Usage: python benchmarks/convert.py [--gb 4.5] [--modes keep-fp8,bf16] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from mimo_jax.checkpoint import fp8
from mimo_jax.checkpoint.convert import QUANTIZED
from mimo_jax.checkpoint.hf_mapping import hf_shapes, tensor_maps
from mimo_jax.checkpoint.release import model_shapes
from mimo_jax.checkpoint.safetensors_io import DTYPES, ShardedWriter
from mimo_jax.model.config import ModelConfig

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
    evict(files)
    buf = bytearray(64 << 20)
    total, t0 = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / (time.perf_counter() - t0)


def run_converter(src: str, dst: str, mode: str) -> tuple[float, int]:
    flag = ["--keep-fp8"] if mode == "keep-fp8" else ["--dtype", mode]
    cmd = [sys.executable, "-m", "mimo_jax.commands.convert", "hf-to-orbax", src, dst,
           "--no-progress", *flag]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"converter failed: {cmd}")
    return wall, usage.ru_maxrss * 1024


def release_bytes() -> int:
    cfg = ModelConfig.flash()
    return sum(dt.itemsize * int(np.prod(s)) for _, dt, s in plan_release(cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/mimo_convert_bench")
    ap.add_argument("--experts", type=int, default=80)
    ap.add_argument("--shard-gb", type=float, default=1.1)
    ap.add_argument("--modes", default="keep-fp8,bf16")
    args = ap.parse_args()
    cfg = ModelConfig.flash(num_layers=3, num_experts=args.experts, vocab_size=32768,
                            num_mtp_layers=0, layer_types=("full", "sliding", "sliding"))
    full = release_bytes()
    src = os.path.join(args.dir, "release")
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        files = build(src, cfg, int(args.shard_gb * GiB))
        sizes = [os.path.getsize(f) for f in files]
        print(f"built {len(files)} shards, {sum(sizes) / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f}s")
        raw = raw_read(files)
        rows = []
        for mode in args.modes.split(","):
            dst = os.path.join(args.dir, f"out-{mode}")
            evict(files)
            wall, peak = run_converter(src, dst, mode)
            out_bytes = sum(os.path.getsize(os.path.join(r, f))
                            for r, _, fs in os.walk(dst) for f in fs)
            shutil.rmtree(dst)
            rows.append(dict(mode=mode, wall_s=wall, src_gbps=sum(sizes) / wall / 1e9,
                             ratio_to_raw=sum(sizes) / wall / raw, peak_rss_gib=peak / GiB,
                             peak_goal_gib=(1.5 * max(sizes) + GiB) / GiB,
                             out_gb=out_bytes / 1e9))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    head = (f"source: {len(sizes)} shards, {sum(sizes) / 1e9:.2f} GB, largest "
            f"{max(sizes) / GiB:.2f} GiB; raw cold read {raw / 1e9:.3f} GB/s")
    lines = ["| mode | wall s | source GB/s | vs raw read | peak RSS GiB | peak goal GiB | "
             "output GB | full release (est. " + f"{full / 1e9:.0f} GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal_ok = "ok" if r["peak_rss_gib"] <= r["peak_goal_gib"] else "MISSED"
        tp_ok = "ok" if r["ratio_to_raw"] >= 0.5 else "MISSED"
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {r['src_gbps']:.3f} | "
                     f"{r['ratio_to_raw']:.2f}x ({tp_ok}) | {r['peak_rss_gib']:.2f} ({goal_ok}) | "
                     f"{r['peak_goal_gib']:.2f} | {r['out_gb']:.2f} | "
                     f"{full / r['src_gbps'] / 1e9 / 3600:.2f} h, "
                     f"peak ~{r['peak_rss_gib']:.1f} GiB |")
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
                load_avg=os.getloadavg())
    out = os.path.join(os.path.dirname(__file__), "results", "convert")
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, shards=sizes, raw_read_gbps=raw / 1e9, rows=rows,
                       full_release_bytes=full), f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(f"# convert benchmark ({meta['date']})\n\nmachine: {meta['nproc']} CPUs, "
                f"{meta['cpu']}, load avg at end {meta['load_avg']}; orbax {meta['orbax']}, "
                f"tensorstore {meta['tensorstore']}\n\n{head}\n\n" + "\n".join(lines) + "\n\n"
                "Method: see the docstring of benchmarks/convert.py. The projection scales "
                "wall time by the bytes of the full release's safetensors (FP8 layout computed "
                "from the flash config); peak memory does not grow with the model (bounded by "
                "one tensor + one TensorStore transaction).\n")


if __name__ == "__main__":
    main()
