"""One GPU (H100/H200): the kernels compiled for real, against references and vendor baselines.

    PYTHONPATH=. python3 benchmarks/gpu.py --out benchmarks/results [--quick] [--budget-s 430]
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 benchmarks/gpu.py --quick --cpu-smoke --out /tmp/x

Needs only jax (CUDA), flax, optax, numpy: no grain, tensorboardX or lm-eval; the repo need
not be pip-installed. Sections, in this order, each timed on its own and failing on its own:

1. env: versions, device, which optional packages are absent;
2. matmul_peak: a bf16 matmul, the peak MFU is measured against (same run);
3. correctness: Pallas kernels compiled (not interpreted) vs the references, forward and every
   gradient; a small model's logits with the default kernels vs the reference kernels;
4. slice: forward+backward of a 6-layer release slice (hidden 4096, 32 experts top-8, no MTP
   head as in the issue's 43.5% figure, bf16, batch 4 x 4096): ms, tokens/s, MFU vs the
   measured matmul peak (remat none, and full in the full mode);
5. train_step: the full training step (loss with 1 MTP head, grads, clipping, AdamW, bias
   update) on the same slice with float32 master weights (bf16 if those do not fit), donated
   state;
6. decode: tokens/s at batch 1 and 32 with and without MTP speculation (same slice, 3 heads,
   random weights: acceptance is that of random heads, the cost of drafting is real);
7. attention: sliding-window (129 keys, sinks) Pallas fwd and fwd+bwd vs the XLA banded path
   and cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`, full causal and with a
   local window) at T = 4K..32K; release head shapes (64 q / 8 kv heads, q/k 192, v 128),
   bf16; a Pallas block-size sweep at 16K;
8. ragged: the grouped matmul (and a tile / warp sweep) vs `jax.lax.ragged_dot` and a dense
   matmul of equal FLOPs.

Times are medians of >= 5 calls after a warm-up call (compile), each ended by
`block_until_ready`. A global budget (default 430 s, counted from the start) skips what would
not fit, and says so. JAX may take 95% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION,
unless set): the float32-master-weight step needs ~120 GB. Writes OUT/gpu.json and OUT/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


@dataclasses.dataclass
class Run:
    quick: bool
    smoke: bool  # CPU, interpret mode, toy sizes: checks the script, not the hardware
    budget_s: float
    reps: int
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - START)

    @property
    def interpret(self) -> bool | None:
        return True if self.smoke else False


# ----------------------------------------------------------------------------- timing


def _block(x):
    import jax

    return jax.block_until_ready(x)


def bench(fn: Callable, *args, reps: int = 5) -> dict[str, float]:
    """Compile + first call, then the median of `reps` calls (seconds)."""
    t0 = time.perf_counter()
    _block(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def rel_err(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want), initial=0.0) / max(1.0, np.max(np.abs(want),
                                                                             initial=0.0)))


# ----------------------------------------------------------------------------- sections


def section_env(run: Run) -> dict:
    import flax
    import jax
    import jaxlib

    dev = jax.devices()[0]
    absent = [m for m in ("grain", "tensorboardX", "lm_eval")
              if importlib.util.find_spec(m) is None]
    import mimo_jax  # noqa: F401  must import without the training-only packages

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "device": dev.device_kind,
            "device_count": jax.device_count(), "absent_optional": absent,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def section_matmul_peak(run: Run) -> dict:
    import jax
    import jax.numpy as jnp

    sizes = [256] if run.smoke else ([8192] if run.quick else [8192, 16384])
    rows, best = [], 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
        t = bench(jax.jit(lambda x, y: x @ y), a, b, reps=max(run.reps, 10))
        tflops = 2 * n**3 / t["median_s"] / 1e12
        best = max(best, tflops)
        rows.append({"n": n, "ms": 1e3 * t["median_s"], "tflops": tflops})
        log(f"  bf16 matmul {n}^3: {1e3 * t['median_s']:.2f} ms, {tflops:.0f} TFLOP/s")
    run.results["peak_tflops"] = best
    return {"rows": rows, "peak_tflops": best}


def _attention_inputs(b, t, hq, hkv, dqk, dv, dtype, seed=0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1).astype(np.int32)
    seg[:, :3] = 0  # padding rows at the front: fully masked
    return dict(q=normal(b, t, hq, dqk), k=normal(b, t, hkv, dqk), v=normal(b, t, hkv, dv),
                sinks=jnp.asarray(1.5 * rng.standard_normal(hq, np.float32)),
                seg=jnp.asarray(seg), do=normal(b, t, hq, dv))


def _attn_fn(impl: str, window, interpret, with_sinks=True, with_seg=False):
    import pallas_kernels

    def f(q, k, v, sinks, seg):
        kw = {} if impl not in ("pallas_gpu", "pallas_tpu") else {"interpret": interpret}
        return pallas_kernels.attention(q, k, v, sinks=sinks if with_sinks else None,
                                        window=window, segment_ids=seg if with_seg else None,
                                        implementation=impl, **kw)
    return f


def section_correctness(run: Run) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_kernels
    from pallas_kernels.attn import use_implementation as use_attention
    from pallas_kernels.ragged import use_implementation as use_ragged

    out: dict[str, Any] = {"attention": [], "ragged": [], "model": None}
    # Attention: bf16 inputs; the reference runs in float32 on the same rounded values.
    shape = (1, 40, 4, 2, 16, 8) if run.smoke else (2, 1000, 16, 2, 192, 128)
    b, t, hq, hkv, dqk, dv = shape
    x = _attention_inputs(b, t, hq, hkv, dqk, dv, jnp.bfloat16)
    f32 = {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in x.items()}
    configs = ((129, True, True), (None, False, False))
    for window, sinks, seg in configs[:1] if run.smoke else configs:
        def grads(impl, a, window=window, sinks=sinks, seg=seg):
            f = _attn_fn(impl, window, run.interpret, sinks, seg)
            o, vjp = jax.vjp(lambda q, k, v, s: f(q, k, v, s, a["seg"]),
                             a["q"], a["k"], a["v"], a["sinks"])
            return (o, *vjp(a["do"]))

        want = jax.jit(lambda a: grads("reference", a))(f32)
        for impl in ("pallas_gpu", "xla"):
            got = jax.jit(lambda a, impl=impl: grads(impl, a))(x)
            names = ("out", "dq", "dk", "dv") + (("dsinks",) if sinks else ())
            errs = {n: rel_err(g, w) for n, g, w in zip(names, got, want, strict=False)}
            row = {"impl": impl, "window": window, "sinks": sinks, "segments": seg,
                   "shape": list(shape), **errs, "ok": max(errs.values()) < 6e-2}
            out["attention"].append(row)
            log(f"  attention {impl} window={window}: max err "
                f"{max(errs.values()):.2e} ({'ok' if row['ok'] else 'HIGH'})")

    # Ragged: bf16 in, f32 out, against a float32 per-group loop; empty groups, rows past sum.
    m, k, n, g = (40, 20, 24, 4) if run.smoke else (2048, 768, 512, 16)
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.integers(0, m - 7, g - 1))  # 7 rows past the sum
    sizes = np.diff(np.concatenate([[0], cuts, [m - 7]])).astype(np.int32)
    sizes[2] += sizes[1]  # group 1 empty
    sizes[1] = 0
    xm = jnp.asarray(rng.standard_normal((m, k), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((g, k, n), np.float32)).astype(jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n), np.float32))
    gs = jnp.asarray(sizes)

    def loop_ref(xm, w):
        parts, start = [], 0
        for gi, s in enumerate(sizes.tolist()):
            parts.append(jnp.matmul(xm[start:start + s].astype(jnp.float32),
                                    w[gi].astype(jnp.float32), precision="highest"))
            start += s
        parts.append(jnp.zeros((m - start, n), jnp.float32))
        return jnp.concatenate(parts)

    y_ref, vjp_ref = jax.vjp(loop_ref, xm, w)
    want = (y_ref, *vjp_ref(dy))
    for impl in ("pallas_gpu", "reference"):
        def fwd_bwd(xm, w, dy, impl=impl):
            kw = {"interpret": run.interpret} if impl == "pallas_gpu" else {}
            f = lambda xm, w: pallas_kernels.ragged_matmul(  # noqa: E731
                xm, w, gs, preferred_element_type=jnp.float32, implementation=impl, **kw)
            y, vjp = jax.vjp(f, xm, w)
            return (y, *vjp(dy))
        got = jax.jit(fwd_bwd)(xm, w, dy)
        errs = {nm: rel_err(gg, ww) for nm, gg, ww in zip(("y", "dx", "dw"), got, want,
                                                           strict=True)}
        tail_zero = bool(np.all(np.asarray(got[0])[int(sizes.sum()):] == 0))
        row = {"impl": impl, "m": m, "k": k, "n": n, "groups": g, **errs,
               "rows_past_sum_zero": tail_zero, "ok": max(errs.values()) < 3e-2 and tail_zero}
        out["ragged"].append(row)
        log(f"  ragged {impl}: max err {max(errs.values()):.2e} "
            f"({'ok' if row['ok'] else 'HIGH'})")

    out["decode"] = _decode_correctness(run)

    # A small model: default kernels (Pallas on GPU) vs the reference kernels, same weights.
    # float32, so that discrete routing choices do not amplify bf16 rounding differences.
    from flax import nnx

    import mimo_jax

    cfg = mimo_jax.ModelConfig.tiny(num_layers=3, num_mtp_layers=1)
    model = mimo_jax.MiMo(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 256)), jnp.int32)

    def logits():  # a new function per use: jit caches by function, not by kernel choice
        return nnx.jit(lambda model, ids: model(ids).logits.astype(jnp.float32))

    with use_attention("reference"), use_ragged("reference"):
        want = logits()(model, ids)
    with use_attention("pallas_gpu", interpret=run.interpret), \
            use_ragged("pallas_gpu", interpret=run.interpret):
        got = logits()(model, ids)
    err = float(jnp.max(jnp.abs(got - want)))
    scale = float(jnp.max(jnp.abs(want)))
    out["model"] = {"config": "tiny (3 layers, float32)", "max_abs_logit_err": err,
                    "max_abs_logit": scale, "ok": err <= 2e-3 * max(scale, 1.0)}
    log(f"  model logits, Pallas vs reference kernels: max |diff| {err:.3e} (|logit| <= "
        f"{scale:.2f})")
    return out


def _decode_correctness(run: Run) -> list[dict]:
    """Generation's cached attention (Pallas on GPU) vs the masked reference: a sliding ring
    (128 slots in scrambled order, window 128, sinks) and a partly filled global cache, decode
    (T = 1) and verify (T = 4) rows at per-row offsets, bf16 cache; then greedy generation with
    the default decode kernel vs the XLA one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.decode import cached_attention
    from pallas_kernels.decode import use_implementation as use_decode

    rows = []
    hq, hkv_ring, hkv_glob, dqk, dv = (4, 2, 2, 16, 8) if run.smoke else (64, 8, 4, 192, 128)
    for hkv, slots, window, t in ((hkv_ring, 128, 128, 1), (hkv_ring, 128, 128, 4),
                                  (hkv_glob, 4096, None, 1), (hkv_glob, 4096, None, 4)):
        rng = np.random.default_rng(slots + t)
        b = 4
        q_offset = rng.integers(1, 3 * slots if window else slots - t, b).astype(np.int32)
        pos = np.full((b, slots), -1, np.int32)
        for i, off in enumerate(q_offset):
            if window:  # a ring holds the last `slots` positions, slot order scrambled
                held = np.arange(max(0, off - slots), off)
                pos[i, rng.permutation(slots)[: len(held)]] = held
            else:
                pos[i, :off] = np.arange(off)
        new_pos = (q_offset[:, None] + np.arange(t)).astype(np.int32)
        args = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(jnp.bfloat16)
                     for shape in ((b, t, hq, dqk), (b, hkv, slots, dqk), (b, hkv, slots, dv)))
        args += (jnp.asarray(pos),) + tuple(
            jnp.asarray(rng.standard_normal(shape, np.float32)).astype(jnp.bfloat16)
            for shape in ((b, t, hkv, dqk), (b, t, hkv, dv))) + (jnp.asarray(new_pos),)
        kw = dict(q_offset=jnp.asarray(q_offset), sinks=jnp.asarray(
            rng.standard_normal(hq), jnp.float32) if window else None, window=window,
            cache_length=None if window else jnp.asarray(q_offset))
        f32 = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args)
        want = jax.jit(functools.partial(cached_attention, implementation="reference", **kw))(
            *f32)
        impl = "xla" if run.smoke else "pallas_gpu"
        got = jax.jit(functools.partial(cached_attention, implementation=impl, **kw))(*args)
        err = rel_err(got, want)
        row = {"impl": impl, "slots": slots, "window": window, "queries": t, "kv_heads": hkv,
               "err": err, "ok": err < 3e-2}
        rows.append(row)
        log(f"  decode attention {impl} slots={slots} window={window} T={t}: err {err:.2e} "
            f"({'ok' if row['ok'] else 'HIGH'})")

    # Greedy generation: default decode kernel (Pallas on GPU) vs XLA, float32 tiny model.
    from flax import nnx

    import mimo_jax

    model = mimo_jax.MiMo(mimo_jax.ModelConfig.tiny(num_layers=3, num_mtp_layers=2),
                          rngs=nnx.Rngs(3))
    prompts = [list(range(1, 40)), [5, 6, 7], list(range(100, 300))]
    base = mimo_jax.generate(model, prompts, max_new_tokens=24, speculative=2).tokens
    with use_decode("xla"):
        other = mimo_jax.generate(model, prompts, max_new_tokens=24, speculative=2).tokens
    agree = float(np.mean(np.asarray(base) == np.asarray(other)))
    rows.append({"generation": "default decode kernel vs xla, greedy, K=2, 3 rows",
                 "token_agreement": agree, "ok": agree == 1.0})
    log(f"  generation, default vs XLA decode attention: token agreement {agree:.3f}")
    return rows


def _attention_flops(t, hq, dqk, dv, window, bwd: bool) -> float:
    """Useful FLOPs: each query against the keys it may see (causal: (t+1)/2 on average)."""
    keys = (t + 1) / 2 if window is None else min(window, t)
    fwd = 2 * hq * t * keys * (dqk + dv)
    return fwd * (3.5 if bwd else 1.0)  # backward: recompute s, dv, dp, dq, dk = 2.5x fwd


def section_attention(run: Run) -> dict:
    import jax
    import jax.numpy as jnp

    import pallas_kernels

    hq, hkv, dqk, dv = (4, 2, 16, 8) if run.smoke else (64, 8, 192, 128)
    seqs = [64] if run.smoke else ([4096, 16384] if run.quick else
                                         [4096, 8192, 16384, 32768])
    window = 129 if not run.smoke else 17
    rows = []
    cudnn_impl = "xla" if run.smoke else "cudnn"  # the same call on CPU, to test the script

    for t in seqs:
        if run.left() < 25:
            rows.append({"t": t, "skipped": "budget"})
            log(f"  T={t}: skipped (budget)")
            continue
        x = _attention_inputs(1, t, hq, hkv, dqk, dv, jnp.bfloat16, seed=t)

        def pallas(q, k, v, s, window=window):
            return pallas_kernels.attention(q, k, v, sinks=s, window=window,
                                            implementation="pallas_gpu",
                                            interpret=run.interpret)

        def banded(q, k, v, s, window=window):
            return pallas_kernels.attention(q, k, v, sinks=s, window=window,
                                            implementation="xla")

        def cudnn_full(q, k, v, s):
            # cuDNN wants one head dim for q, k and v: v is zero-padded to 192, out sliced.
            vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dqk - dv)))
            o = jax.nn.dot_product_attention(q, k, vp, is_causal=True,
                                             implementation=cudnn_impl)
            return o[..., :dv]

        def cudnn_local(q, k, v, s, window=window):
            vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dqk - dv)))
            o = jax.nn.dot_product_attention(q, k, vp, is_causal=True,
                                             local_window_size=(window - 1, 0),
                                             implementation=cudnn_impl)
            return o[..., :dv]

        def pallas_full(q, k, v, s):
            return pallas_kernels.attention(q, k, v, window=None, implementation="pallas_gpu",
                                            interpret=run.interpret)

        cases = [("pallas SWA+sinks", pallas, window), ("xla banded SWA+sinks", banded, window),
                 ("cudnn full causal", cudnn_full, None), ("cudnn local window", cudnn_local,
                                                           window),
                 ("pallas full causal", pallas_full, None)]
        for name, f, w in cases:
            for bwd in (False, True):
                if run.left() < 15:
                    rows.append({"t": t, "impl": name, "bwd": bwd, "skipped": "budget"})
                    continue
                if bwd:
                    def step(q, k, v, s, do, f=f):
                        o, vjp = jax.vjp(f, q, k, v, s)
                        return vjp(do)
                    fn = jax.jit(step)
                    args = (x["q"], x["k"], x["v"], x["sinks"], x["do"])
                else:
                    fn = jax.jit(f)
                    args = (x["q"], x["k"], x["v"], x["sinks"])
                row = {"t": t, "impl": name, "bwd": bwd}
                try:
                    tm = bench(fn, *args, reps=run.reps)
                    flops = _attention_flops(t, hq, dqk, dv, w, bwd)
                    row.update(ms=1e3 * tm["median_s"], compile_s=tm["first_s"],
                               tflops=flops / tm["median_s"] / 1e12)
                    log(f"  T={t} {name} {'fwd+bwd' if bwd else 'fwd'}: {row['ms']:.2f} ms "
                        f"({row['tflops']:.0f} useful TFLOP/s)")
                except Exception as e:  # e.g. a cuDNN configuration it does not support
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"  T={t} {name}: {row['error'][:160]}")
                rows.append(row)
                del fn
    sweep = _attention_block_sweep(run, hq, hkv, dqk, dv, window) if not run.quick else []
    ratios = {}
    for t in seqs:
        def ms(impl, bwd, t=t):
            hit = [r for r in rows if r.get("t") == t and r.get("impl") == impl
                   and r.get("bwd") == bwd and "ms" in r]
            return hit[0]["ms"] if hit else None
        ours, full = ms("pallas SWA+sinks", True), ms("cudnn full causal", True)
        if ours and full:
            ratios[str(t)] = full / ours
    return {"rows": rows, "block_sweep": sweep, "swa_fwd_bwd_speedup_vs_cudnn_full": ratios,
            "shape": {"batch": 1, "q_heads": hq, "kv_heads": hkv, "qk_dim": dqk, "v_dim": dv,
                      "window": window, "dtype": "bfloat16"}}


def _attention_block_sweep(run: Run, hq, hkv, dqk, dv, window, t: int = 16384) -> list[dict]:
    """Pallas GPU block sizes (fwd q x kv, bwd q x kv) for the sliding layers at one T."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attn.pallas_gpu import BlockSizes, pallas_gpu_attention

    x = _attention_inputs(1, t, hq, hkv, dqk, dv, jnp.bfloat16, seed=1)
    rows = []
    for sizes in ((64, 64, 32, 32), (64, 64, 64, 64), (128, 64, 64, 32), (64, 32, 32, 64),
                  (128, 128, 64, 64)):
        if run.left() < 60:
            rows.append({"blocks": str(sizes), "skipped": "budget"})
            continue
        bs = BlockSizes(*sizes)

        def f(q, k, v, s, bs=bs):
            return pallas_gpu_attention(q, k, v, sinks=s, window=window, q_segment_ids=None,
                                        kv_segment_ids=None, q_offset=jnp.int32(0),
                                        scale=dqk**-0.5, block_sizes=bs,
                                        interpret=run.interpret)

        def step(q, k, v, s, do, f=f):
            return jax.vjp(f, q, k, v, s)[1](do)

        row = {"t": t, "blocks (fwd q,kv, bwd q,kv)": str(sizes)}
        try:
            fwd = bench(jax.jit(f), x["q"], x["k"], x["v"], x["sinks"], reps=run.reps)
            both = bench(jax.jit(step), x["q"], x["k"], x["v"], x["sinks"], x["do"],
                         reps=run.reps)
            row.update(fwd_ms=1e3 * fwd["median_s"], fwd_bwd_ms=1e3 * both["median_s"])
            log(f"  blocks {sizes}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f}"
                " ms")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  blocks {sizes}: {row['error'][:160]}")
        rows.append(row)
    return rows


def _group_sizes(m: int, g: int, seed: int):
    """Token-choice routing of m rows over g experts: roughly balanced, never exact."""
    import numpy as np

    counts = np.random.default_rng(seed).multinomial(m, np.full(g, 1.0 / g))
    return counts.astype(np.int32)


def section_ragged(run: Run) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_kernels
    from pallas_kernels.ragged.pallas_gpu import make_pallas_gpu

    if run.smoke:
        shapes = [(64, 32, 48, 4)]
    elif run.quick:
        shapes = [(32768, 4096, 2048, 32)]
    else:
        shapes = [(32768, 4096, 2048, 32), (32768, 2048, 4096, 32), (32768, 4096, 2048, 256)]
    # (tm, tk, tn, num_warps, num_stages); None = the defaults.
    tilings = [None, (128, 64, 64, 4, 2)] if run.smoke else [None] if run.quick else [
        None, (128, 64, 64, 4, 2), (64, 128, 64, 4, 2), (128, 128, 64, 8, 3),
        (128, 64, 128, 8, 3), (64, 64, 128, 4, 3)]
    rows = []
    for m, k, n, g in shapes:
        if run.left() < 25:
            rows.append({"shape": [m, k, n, g], "skipped": "budget"})
            continue
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((m, k), np.float32)).astype(jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((g, k, n), np.float32) / np.sqrt(k)).astype(
            jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((m, n), np.float32)).astype(jnp.bfloat16)
        gs = jnp.asarray(_group_sizes(m, g, 1))
        w_dense = w[0]

        impls: list[tuple[str, Callable]] = []
        for tiling in tilings:
            if tiling is None:
                impls.append(("pallas (default tiles)", lambda x, w, gs: pallas_kernels
                              .ragged_matmul(x, w, gs, implementation="pallas_gpu",
                                             interpret=run.interpret)))
            else:
                op = make_pallas_gpu(tiling=tiling[:3], num_warps=tiling[3],
                                     num_stages=tiling[4], interpret=run.interpret)
                impls.append((f"pallas tiles/warps/stages {tiling}", lambda x, w, gs, op=op: op(
                    x, w, gs, transpose_rhs=False, preferred_element_type=None)))
        if g <= 64:  # jaxlib expands ragged_dot densely on GPU: G=256 takes ~90 s and 64 GiB
            impls.append(("lax.ragged_dot", lambda x, w, gs: jax.lax.ragged_dot(x, w, gs)))
        impls.append(("dense matmul, equal FLOPs", lambda x, w, gs, wd=w_dense: x @ wd))
        for name, f in impls:
            for bwd in (False, True):
                if run.left() < 10:
                    rows.append({"shape": [m, k, n, g], "impl": name, "bwd": bwd,
                                 "skipped": "budget"})
                    continue
                if bwd:
                    def step(x, w, gs, dy, f=f):
                        _, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
                        return vjp(dy)
                    fn, args = jax.jit(step), (x, w, gs, dy)
                else:
                    fn, args = jax.jit(f), (x, w, gs)
                row = {"shape": [m, k, n, g], "impl": name, "bwd": bwd}
                try:
                    tm = bench(fn, *args, reps=run.reps)
                    flops = 2 * m * k * n * (3 if bwd else 1)
                    row.update(ms=1e3 * tm["median_s"], compile_s=tm["first_s"],
                               tflops=flops / tm["median_s"] / 1e12)
                    log(f"  ragged {m}x{k}->{n} G={g} {name} {'fwd+bwd' if bwd else 'fwd'}: "
                        f"{row['ms']:.2f} ms ({row['tflops']:.0f} TFLOP/s)")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"  ragged {name}: {row['error'][:160]}")
                rows.append(row)
    ratios = {}
    for m, k, n, g in shapes:
        for bwd in (False, True):
            got = {r["impl"]: r["ms"] for r in rows if r.get("shape") == [m, k, n, g]
                   and r.get("bwd") == bwd and "ms" in r}
            dense = got.get("dense matmul, equal FLOPs")
            ours = min((v for kk, v in got.items() if kk.startswith("pallas")), default=None)
            if dense and ours:
                ratios[f"{m}x{k}->{n} G={g} {'fwd+bwd' if bwd else 'fwd'}"] = ours / dense
    return {"rows": rows, "pallas_best_over_dense": ratios}


def _slice_config(run: Run, num_mtp: int):
    import mimo_jax

    if run.smoke:  # float32: XLA:CPU lacks some bf16 x bf16 -> f32 dots the decode path uses
        return mimo_jax.ModelConfig.tiny(num_layers=2, num_mtp_layers=num_mtp)
    return mimo_jax.ModelConfig.flash(num_layers=6, num_experts=32, num_mtp_layers=num_mtp,
                                      dtype="bfloat16", param_dtype="bfloat16")


def _batch(cfg, b: int, t: int, seed: int = 0) -> dict:
    import jax.numpy as jnp
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    return {"ids": jnp.asarray(ids), "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def _kernels(run: Run):
    """The model's kernels: the GPU defaults, or interpreted on the CPU smoke run."""
    import contextlib

    from pallas_kernels.attn import use_implementation as use_attention
    from pallas_kernels.ragged import use_implementation as use_ragged

    stack = contextlib.ExitStack()
    stack.enter_context(use_attention("pallas_gpu", interpret=run.interpret))
    stack.enter_context(use_ragged("pallas_gpu", interpret=run.interpret))
    return stack


def _slice_fwd_bwd(run: Run, remat: str, b: int, t: int) -> dict:
    import jax
    from flax import nnx

    import mimo_jax
    from mimo_jax.train.loss import loss_parts, total_loss
    from mimo_jax.train.metrics import flops_per_token
    from mimo_jax.train.step import target_counts

    cfg = _slice_config(run, 0)
    model = mimo_jax.MiMo(cfg, rngs=nnx.Rngs(0), remat=remat)
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    del model
    batch = _batch(cfg, b, t)
    n_heads = 1 + cfg.num_mtp_layers

    def loss(params, other, batch):
        parts = loss_parts(nnx.merge(graphdef, params, other), batch, chunk=8192)
        counts = target_counts(batch, n_heads)
        return total_loss(parts, counts, mtp_lambda=0.3, balance_coef=1e-5, z_loss_coef=0.0)[0]

    with _kernels(run):
        tm = bench(jax.jit(jax.value_and_grad(loss)), params, other, batch, reps=run.reps)
    tokens = b * t
    flops = flops_per_token(cfg, t) * tokens
    row = {"batch": f"{b}x{t}", "remat": remat, "ms": 1e3 * tm["median_s"],
           "compile_s": tm["first_s"], "tokens_per_s": tokens / tm["median_s"],
           "model_tflops": flops / tm["median_s"] / 1e12,
           "params": mimo_jax.param_count(cfg).total_with_mtp}
    peak = run.results.get("peak_tflops")
    if peak:
        row["mfu_vs_measured_peak"] = row["model_tflops"] / peak
    return row


def section_slice(run: Run) -> dict:
    b, t = (2, 64) if run.smoke else (4, 4096)
    out = {}
    for remat in (("none",) if (run.quick or run.smoke) else ("none", "full")):
        if run.left() < 60:
            out[remat] = {"skipped": "budget"}
            continue
        row = out[remat] = _slice_fwd_bwd(run, remat, b, t)
        mfu = row.get("mfu_vs_measured_peak")
        log(f"  slice fwd+bwd remat={remat}: {row['ms']:.0f} ms, {row['tokens_per_s']:,.0f} "
            f"tok/s, {row['model_tflops']:.0f} TFLOP/s"
            + (f", MFU {100 * mfu:.1f}%" if mfu else ""))
    return out


def section_decode(run: Run) -> dict:
    import numpy as np
    from flax import nnx

    import mimo_jax

    cfg = _slice_config(run, 3)
    model = mimo_jax.MiMo(cfg, rngs=nnx.Rngs(0))
    prompt_len = 8 if run.smoke else 128
    new = 4 if run.smoke else (32 if run.quick else 64)
    rows = []
    for batch in (1, 2) if run.smoke else (1, 32):
        prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size,
                                                        (batch, prompt_len)).tolist()
        for k in (0, 3):
            if run.left() < 30:
                rows.append({"batch": batch, "speculative": k, "skipped": "budget"})
                continue
            with _kernels(run):
                first = mimo_jax.generate(model, prompts, max_new_tokens=new, speculative=k)
                res = [mimo_jax.generate(model, prompts, max_new_tokens=new, speculative=k)
                       for _ in range(1 if run.smoke else 3)]
            med = sorted(res, key=lambda r: r.tokens_per_second)[len(res) // 2]
            row = {"batch": batch, "speculative": k, "prompt": prompt_len, "new_tokens": new,
                   "tokens_per_s": med.tokens_per_second,
                   "decode_tokens_per_s": med.num_new_tokens / max(med.decode_seconds, 1e-9),
                   "acceptance_length": med.acceptance_length,
                   "compile_s": first.compile_seconds}
            rows.append(row)
            log(f"  decode batch {batch} spec {k}: {row['tokens_per_s']:,.0f} tok/s "
                f"(decode only {row['decode_tokens_per_s']:,.0f}), acceptance "
                f"{row['acceptance_length']}")
    return {"rows": rows, "note": "random weights: MTP acceptance is that of untrained heads"}


def _train_step(run: Run, param_dtype: str, b: int, t: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import mimo_jax
    from mimo_jax.train.config import PRESETS
    from mimo_jax.train.metrics import flops_per_token
    from mimo_jax.train.optimizer import make_optimizer
    from mimo_jax.train.step import make_train_step

    if run.smoke:
        base, over = PRESETS["tiny-cpu"], {"num_layers": 2, "num_mtp_layers": 1}
    else:
        base, over = PRESETS["flash"], {"num_layers": 6, "num_experts": 32, "num_mtp_layers": 1}
    tc = dataclasses.replace(base, model=over, batch_size=b, seq_len=t, param_dtype=param_dtype,
                             compute_dtype="float32" if run.smoke else "bfloat16",
                             remat="full", loss_chunk_tokens=8192)
    cfg = tc.model_config()
    model = mimo_jax.MiMo(cfg, rngs=nnx.Rngs(0), remat=tc.remat)
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    del model
    tx = make_optimizer(tc)
    # Donate the state: a step needs the new parameters and moments, not both copies.
    step = jax.jit(make_train_step(graphdef, tc, cfg, tx), donate_argnums=(0, 1, 2))
    batch = _batch(cfg, b, t)
    state = [params, other, jax.jit(tx.init)(params)]
    del params, other

    def call():
        *new_state, metrics = step(*state, batch, jnp.int32(0))
        state[:] = new_state
        return metrics["loss"]

    with _kernels(run):
        tm = bench(call, reps=run.reps)
    tokens = b * t
    flops = flops_per_token(cfg, t) * tokens
    row = {"param_dtype": param_dtype, "batch": f"{b}x{t}", "remat": tc.remat,
           "ms": 1e3 * tm["median_s"], "compile_s": tm["first_s"],
           "tokens_per_s": tokens / tm["median_s"], "model_tflops": flops / tm["median_s"] / 1e12,
           "loss": float(call())}
    if run.results.get("peak_tflops"):
        row["mfu_vs_measured_peak"] = row["model_tflops"] / run.results["peak_tflops"]
    state.clear()
    return row


def section_train_step(run: Run) -> dict:
    b, t = (2, 64) if run.smoke else (4, 4096)
    out = {}
    for param_dtype in ("float32", "bfloat16"):  # bf16 only if float32 master weights fail
        try:
            row = out[param_dtype] = _train_step(run, param_dtype, b, t)
            log(f"  train step ({param_dtype} master weights): {row['ms']:.0f} ms, "
                f"{row['tokens_per_s']:,.0f} tok/s, loss {row['loss']:.3f}")
            break
        except Exception as e:  # e.g. out of memory
            out[param_dtype] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  train step ({param_dtype}): {out[param_dtype]['error'][:160]}")
            if run.left() < 60:
                break
    return out


SECTIONS: list[tuple[str, Callable[[Run], dict], float]] = [
    # name, function, seconds it needs at least (skipped when less is left). The model-level
    # figures come first: on one H200 the kernel sweeps after them fill the rest of 8 minutes.
    ("env", section_env, 0),
    ("matmul_peak", section_matmul_peak, 5),
    ("correctness", section_correctness, 20),
    ("slice", section_slice, 60),
    ("train_step", section_train_step, 60),
    ("decode", section_decode, 40),
    ("attention", section_attention, 40),
    ("ragged", section_ragged, 30),
]


# ----------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0")
    return str(v)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def markdown(report: dict) -> str:
    env = report["sections"].get("env", {}).get("result", {})
    lines = ["# GPU benchmark (benchmarks/gpu.py)", "",
             " | ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"mode: {report['mode']}; total {report['total_s']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget", ""]
    for name, sec in report["sections"].items():
        if name == "env":
            continue
        lines += [f"## {name}", "", f"status: {sec['status']} ({sec.get('seconds', 0):.1f} s)"]
        if sec["status"] == "error":
            lines += ["", "```", sec["error"][-1500:], "```"]
        res = sec.get("result")
        if isinstance(res, dict):
            for key, val in res.items():
                if isinstance(val, list) and val and isinstance(val[0], dict):
                    lines += ["", f"{key}:", ""] + _table(val)
                elif isinstance(val, dict) and val and all(isinstance(v, dict)
                                                           for v in val.values()):
                    lines += ["", f"{key}:", ""] + _table([{"": k, **v} for k, v in
                                                           val.items()])
                elif isinstance(val, dict) and val:
                    lines += ["", f"- {key}: " + ", ".join(f"{k}: {_fmt(v)}" for k, v in
                                                          val.items())]
                elif val is not None:
                    lines += ["", f"- {key}: {_fmt(val)}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="toy sizes, kernels interpreted: checks the script on a CPU host")
    ap.add_argument("--budget-s", type=float, default=430.0,
                    help="stop starting sections (and sizes) past this many seconds")
    ap.add_argument("--only", default="", help="comma-separated section names")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # before jax starts: the float32-master-weight train step needs ~120 GB
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    run = Run(quick=args.quick or args.cpu_smoke, smoke=args.cpu_smoke, budget_s=args.budget_s,
              reps=2 if args.cpu_smoke else 5)
    only = {s for s in args.only.split(",") if s}
    report: dict[str, Any] = {"mode": "cpu-smoke" if run.smoke else ("quick" if run.quick
                                                                    else "full"),
                              "budget_s": run.budget_s, "sections": {}}
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        report["total_s"] = time.perf_counter() - START
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, "gpu.md"), "w") as f:
            f.write(markdown(report))

    for name, fn, need in SECTIONS:
        if only and name not in only and name != "env":
            continue
        if run.left() < need:
            report["sections"][name] = {"status": "skipped",
                                        "reason": f"budget: {run.left():.0f} s left, needs "
                                                  f">= {need:.0f} s"}
            log(f"{name}: SKIPPED ({report['sections'][name]['reason']})")
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            result = fn(run)
            report["sections"][name] = {"status": "ok", "result": result}
        except Exception as e:
            report["sections"][name] = {"status": "error",
                                        "error": f"{type(e).__name__}: {e}\n"
                                                 + traceback.format_exc()[-3000:]}
            log(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
        report["sections"][name]["seconds"] = time.perf_counter() - t0
        save()  # after every section: a later crash or kill loses nothing already measured
    save()
    print(markdown(report), flush=True)
    failed = [n for n, s in report["sections"].items() if s["status"] == "error"]
    log(f"done; sections failed: {failed or 'none'}; wrote {args.out}/gpu.{{json,md}}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
