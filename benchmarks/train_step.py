"""Training-step speed: tokens/s and MFU, the cost of MTP heads, and ours vs transformers.

In one run on this machine:
1. the tiny-cpu preset (its model, batch and sequence) with 0, 1 and 3 MTP heads: tokens/s,
   MFU estimate, and step time relative to no MTP head (goal: <= 1.20x for one head), with
   the FLOP ratio the same MFU would give;
2. a ~50M-parameter config (8 layers, 32 experts top-4, batch 2 x 512): tokens/s and MFU,
   and a transformers 5.23 training step (torch eager `MiMoV2FlashForCausalLM`, same weights,
   same batch, CE loss + AdamW + clipping; no MTP heads since transformers has none) against
   ours with no MTP head (goal: ours >= 2x faster).
MFU = model FLOPs (mimo_jax.train.metrics.flops_per_token) / measured peak f32 matmul FLOP/s.
Every side: one warm-up step, then the median of REPEATS steps, the sides of a comparison
interleaved (one step of each per round, so a drifting shared machine slows all alike); the
load average before and after each comparison is recorded, with torch's thread count and the
transformers attention / experts implementations (its defaults on this CPU: "eager" attention
is the only one MiMo-V2-Flash supports there; experts "grouped_mm" when torch has it).
Ours runs the production step: donated state, threaded from step to step, with huge-page
malloc as `mimo-jax train` sets it (mimo_jax.core.host_memory). The ~50M sides each run in a
child process (`common.ChildProcess`): ours with huge-page and with the default malloc,
transformers with glibc's default malloc, as its users run it (the tunable made torch's step
slower here); the tiny 0-MTP step too, in two children, for the malloc comparison.
3. A profile of our ~50M step (benchmarks/step_profile.py): time per category and phase.
Run: .venv/bin/python benchmarks/train_step.py [--no-profile]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    ChildProcess,
    interleaved_runs,
    load_average,
    malloc_setting,
    write_results,
)

import mimo_jax  # noqa: E402
from mimo_jax.core.host_memory import (  # noqa: E402
    ensure_huge_page_malloc,
    with_huge_pages,
    without_huge_pages,
)
from mimo_jax.train import TrainConfig  # noqa: E402
from mimo_jax.train.metrics import flops_per_token, peak_flops_per_device  # noqa: E402
from mimo_jax.train.optimizer import make_optimizer  # noqa: E402
from mimo_jax.train.step import make_train_step  # noqa: E402

# head_dim 96: transformers' rotary dim int(96 * 0.334) = 32 is even (64 gives 21, rejected).
HF_CONFIG = dict(vocab_size=16384, hidden_size=384, intermediate_size=1024,
                 moe_intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=96, v_head_dim=64, n_routed_experts=32,
                 num_experts_per_tok=4, sliding_window=129, max_position_embeddings=4096)
BIG_BATCH, BIG_SEQ = 2, 512


def _batch(b, t, vocab, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)
    return {"ids": jnp.asarray(ids), "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


REPEATS = 7
# A tiny step takes ~0.2 s and this machine's speed wanders by +-15% between steps: the MTP
# ratios need many rounds (with 7 the one-head ratio ranged 1.06-1.33 over four runs).
TINY_REPEATS = 31

# Profile of the ~50M step before this round of work (commit f26af09, same script and
# categories, load average ~8 on 2 cores so absolute ms are inflated; shares are what count).
PROFILE_BEFORE = {
    "total_ms": 4716, "shares_pct": {
        "other.fwd (optimizer/metric passes outside the scope, scan stacking)": 17.5,
        "gmm.bwd": 16.2, "optimizer.opt": 10.5, "attn_core.bwd": 9.0, "lm_head_ce.bwd": 6.6,
        "lm_head_ce.fwd": 6.4, "gmm.fwd": 5.6, "attn_core.fwd": 4.9, "attn_qkv.bwd": 4.8,
        "dense_mlp.bwd": 3.4, "moe_dispatch.fwd": 2.9, "attn_qkv.fwd": 2.4},
    "findings": [
        "einsum projections over (b, t) ('btd,dnh->btnh', MLP 'btd,df->btf'): the weight "
        "gradient's transposing copies fused into elementwise ops (dense-MLP silu grad alone "
        "4% of the ~50M step, 23% of the tiny 1-MTP step) -> 2-D matmuls (layers.linear)",
        "grad_num_zeros metric: an int32 copy of every gradient + tree reduce-window (~4%) "
        "-> per-row reduction",
        "CE: gather transpose = scatter into [tokens, vocab] + a separate transposed dot "
        "-> fused LM head + CE with its own VJP",
    ],
}


def our_step_runner(model, tc, batch):
    """(run, compile s): ``run`` does one donated step, threading the state; compiled here."""
    cfg = model.cfg
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    state = list(jax.tree.map(jnp.copy, (params, other, tx.init(params))))  # donated below
    step = make_train_step(graphdef, tc, cfg, tx)

    def run():
        *new, metrics = step(*state, batch, jnp.int32(0))
        state[:] = new
        jax.block_until_ready(metrics["loss"])

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def _timed(fns: dict, repeats: int = REPEATS, settle: int = 0) -> tuple[dict[str, float], dict]:
    """Median seconds per side, timed in interleaved rounds; the load before/after and every
    timed run (ms, in order), since on a shared machine the spread matters as much."""
    before = load_average()
    times = interleaved_runs(fns, repeats, settle=settle)
    return ({k: statistics.median(v) for k, v in times.items()},
            {"before": before, "after": load_average(),
             "runs_ms": {str(k): [round(x * 1e3) for x in v] for k, v in times.items()}})


def profile_step(model, tc, batch) -> dict:
    """Per-category time of our step (not donated: the profiler reruns the same inputs)."""
    import step_profile

    step_profile.install_scopes()
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    tx = step_profile.scoped_tx(make_optimizer(tc))
    args = (params, other, tx.init(params), batch, jnp.int32(0))
    compiled = make_train_step(graphdef, tc, model.cfg, tx, donate=False).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    cats, top = step_profile.profile(compiled, args)
    total = sum(cats.values())
    return {"total_ms": round(total), "load": load_average(),
            "shares_pct": {k: pct for k, _, pct in step_profile.shares(cats)},
            "top_ops_ms": top[:8]}


def transformers_sides(model_dir: str, ids: list) -> tuple[dict, dict]:
    """For `common.ChildProcess`: a transformers 5.23 training step (CE loss, backward, clip,
    AdamW) of the model saved in `model_dir` on batch `ids`, one side per experts kernel:
    transformers' default on this CPU (torch grouped_mm) and its "eager" per-expert loop (the
    faster is the baseline). The first, untimed, round allocates the optimizer state."""
    from transformers import MiMoV2FlashForCausalLM

    hf = MiMoV2FlashForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    impls = {"attn_implementation": hf.config._attn_implementation,
             "experts_implementation": getattr(hf.config, "_experts_implementation", None)}

    def torch_step(experts: str):
        def run():
            hf.config._experts_implementation = experts
            loss = hf(ids_t, labels=ids_t).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    sides = {k: torch_step(k) for k in dict.fromkeys([impls["experts_implementation"], "eager"])}
    return sides, {"impls": impls, "torch_threads": torch.get_num_threads(),
                   "malloc": malloc_setting()}


def tiny_sides() -> tuple[dict, dict]:
    """For `common.ChildProcess`: the tiny-cpu 0-MTP step as in `main`, in a process whose
    environment picks the malloc."""
    tc = TrainConfig.preset("tiny-cpu").override({"model.num_mtp_layers": 0})
    model = mimo_jax.MiMo(tc.model_config(), rngs=nnx.Rngs(0))
    run, c = our_step_runner(model, tc, _batch(tc.batch_size, tc.seq_len, 259))
    return {"0": run}, {"malloc": malloc_setting(), "compile_s": c}


def ours_sides(model_dir: str, ids: list) -> tuple[dict, dict]:
    """For `common.ChildProcess`: our ~50M step (the model saved in `model_dir`, batch `ids`),
    in a process whose environment picks the malloc."""
    model = mimo_jax.load(model_dir, dtype="float32")
    tc = TrainConfig(batch_size=BIG_BATCH, seq_len=BIG_SEQ, lr=1e-4, warmup_steps=0,
                     balance_coef=0.0, bias_gamma=0.0)
    batch = _batch(BIG_BATCH, BIG_SEQ, HF_CONFIG["vocab_size"])
    if np.asarray(batch["ids"]).tolist() != ids:
        raise RuntimeError("the child's batch differs from the parent's")
    run, c = our_step_runner(model, tc, batch)
    return {"ours": run}, {"malloc": malloc_setting(), "compile_s": c}


def main() -> None:
    load_start = load_average()
    peak, how = peak_flops_per_device()
    rows, extra = [], {"peak_flops": f"{peak / 1e9:.1f} GFLOP/s ({how})"}

    # 1. tiny-cpu preset, MTP heads 0 / 1 / 3, timed in interleaved rounds
    tiny = TrainConfig.preset("tiny-cpu")
    runners, compile_s, cfgs = {}, {}, {}
    for n_mtp in (0, 1, 3):
        tc = tiny.override({"model.num_mtp_layers": n_mtp})
        cfgs[n_mtp] = tc.model_config()
        model = mimo_jax.MiMo(cfgs[n_mtp], rngs=nnx.Rngs(0))
        batch = _batch(tc.batch_size, tc.seq_len, 259)
        runners[n_mtp], compile_s[n_mtp] = our_step_runner(model, tc, batch)
    # ...and the 0-MTP step in two child processes, huge-page vs default malloc: what the
    # former gains, both sides in the same position (a process's position, parent or child,
    # moved a forward's time by ~10% here).
    default_env = without_huge_pages(os.environ)
    huge_env = with_huge_pages(default_env) or default_env
    with ChildProcess("train_step:tiny_sides", {}, env=huge_env) as huge, \
            ChildProcess("train_step:tiny_sides", {}, env=default_env) as default:
        times, extra["load_tiny"] = _timed(
            {**runners, "0, huge pages": huge.side("0"), "0, default malloc": default.side("0")},
            TINY_REPEATS)
    tiny_default_s = times.pop("0, default malloc")
    tiny_huge_s = times.pop("0, huge pages")
    extra["huge_page_malloc_speedup_tiny"] = round(tiny_default_s / tiny_huge_s, 3)
    extra["malloc_tiny"] = {"rows": malloc_setting(), "children": [huge.info["malloc"],
                                                              default.info["malloc"]]}
    tokens = tiny.batch_size * tiny.seq_len
    for n_mtp, s in times.items():
        mfu = flops_per_token(cfgs[n_mtp], tiny.seq_len) * tokens / s / peak
        n_params = mimo_jax.param_count(cfgs[n_mtp]).total_with_mtp
        rows.append([f"tiny-cpu, {n_mtp} MTP", f"{n_params / 1e6:.2f}M",
                     f"{tiny.batch_size}x{tiny.seq_len}", f"{s * 1e3:.0f}", f"{tokens / s:,.0f}",
                     f"{100 * mfu:.1f}%", f"{s / times[0]:.2f}x vs 0 MTP",
                     f"{compile_s[n_mtp]:.0f}"])
        print(rows[-1], flush=True)
    for label, t in [("huge-page malloc", tiny_huge_s), ("glibc default malloc", tiny_default_s)]:
        mfu = flops_per_token(cfgs[0], tiny.seq_len) * tokens / t / peak
        rows.append([f"tiny-cpu, 0 MTP, child process, {label}", rows[0][1], rows[0][2],
                     f"{t * 1e3:.0f}", f"{tokens / t:,.0f}", f"{100 * mfu:.1f}%",
                     f"{t / times[0]:.2f}x vs 0 MTP", "-"])
    extra["mtp_1_head_ratio"] = round(times[1] / times[0], 3)
    # The step-time ratio at equal MFU: below it, the head runs more efficiently than the body.
    for n in (1, 3):
        extra[f"mtp_{n}_head_flop_ratio"] = round(
            flops_per_token(cfgs[n], tiny.seq_len) / flops_per_token(cfgs[0], tiny.seq_len), 3)
    extra["mtp_goal"] = "<= 1.20x step time for one MTP head"

    # 2. ~50M config: ours (no MTP) vs transformers eager, same weights and batch, every side
    # in its own child process: ours with huge-page malloc as `mimo-jax train` runs (and with
    # the default malloc, for what that gains), transformers with glibc's default malloc, as
    # its users run it (huge-page malloc measured slower for torch's step).
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    torch.manual_seed(0)
    hf = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**HF_CONFIG))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        del hf
        model = mimo_jax.load(d, dtype="float32")
        cfg = model.cfg
        tc = TrainConfig(batch_size=BIG_BATCH, seq_len=BIG_SEQ, lr=1e-4, warmup_steps=0,
                         balance_coef=0.0, bias_gamma=0.0)
        batch = _batch(BIG_BATCH, BIG_SEQ, HF_CONFIG["vocab_size"])
        tokens = BIG_BATCH * BIG_SEQ
        child_args = {"model_dir": d, "ids": np.asarray(batch["ids"]).tolist()}
        with ChildProcess("train_step:transformers_sides", child_args, env=default_env) as child, \
                ChildProcess("train_step:ours_sides", child_args, env=huge_env) as ours, \
                ChildProcess("train_step:ours_sides", child_args, env=default_env) as default:
            impls = child.info["impls"]
            times, extra["load_50m"] = _timed(
                {"ours": ours.side("ours"), "ours_default_malloc": default.side("ours"),
                 **{k: child.side(k) for k in child.sides}}, settle=1)
        ours_default_s = times.pop("ours_default_malloc")
        c = ours.info["compile_s"]
    extra["malloc"] = {"ours": ours.info["malloc"], "ours_default_malloc": default.info["malloc"],
                       "transformers": child.info["malloc"]}
    ours_s = times.pop("ours")
    extra["transformers_ms_by_experts_impl"] = {k: round(v * 1e3) for k, v in times.items()}
    best = min(times, key=times.get)
    ref_s = times[best]
    impls["experts_implementation"] = f"{best} (faster of {sorted(times)})"
    mfu = flops_per_token(cfg, BIG_SEQ) * tokens / ours_s / peak
    n_params = mimo_jax.param_count(cfg).total
    rows.append(["~50M, 0 MTP (ours, jit)", f"{n_params / 1e6:.1f}M", f"{BIG_BATCH}x{BIG_SEQ}",
                 f"{ours_s * 1e3:.0f}", f"{tokens / ours_s:,.0f}", f"{100 * mfu:.1f}%",
                 f"{ref_s / ours_s:.2f}x vs torch", f"{c:.0f}"])
    mfu_default = flops_per_token(cfg, BIG_SEQ) * tokens / ours_default_s / peak
    rows.append(["~50M, 0 MTP (ours, glibc default malloc)", f"{n_params / 1e6:.1f}M",
                 f"{BIG_BATCH}x{BIG_SEQ}", f"{ours_default_s * 1e3:.0f}",
                 f"{tokens / ours_default_s:,.0f}", f"{100 * mfu_default:.1f}%",
                 f"{ref_s / ours_default_s:.2f}x vs torch", "-"])
    extra["huge_page_malloc_speedup"] = round(ours_default_s / ours_s, 3)
    ref_mfu = flops_per_token(cfg, BIG_SEQ) * tokens / ref_s / peak
    rows.append(["~50M, transformers eager", f"{n_params / 1e6:.1f}M", f"{BIG_BATCH}x{BIG_SEQ}",
                 f"{ref_s * 1e3:.0f}", f"{tokens / ref_s:,.0f}", f"{100 * ref_mfu:.1f}%",
                 "1.00x", "-"])
    extra["speedup_vs_transformers"] = round(ref_s / ours_s, 2)
    # The ratio at 100% of the measured 1024^2 matmul peak: about the most any step can reach.
    extra["speedup_at_measured_peak"] = round(1 / ref_mfu, 2)
    extra["transformers_goal"] = ">= 2x faster than transformers eager"
    extra["mfu_goal"] = ">= 50% of the measured f32 matmul peak"
    extra["torch_threads"] = child.info["torch_threads"]
    extra["transformers_impl"] = impls
    extra["timing"] = (f"median of {REPEATS} steps ({TINY_REPEATS} for the tiny rows) after "
                       "one warm-up step, every side; the "
                       "sides of each comparison run in interleaved rounds (one timed step of "
                       "each per round, after one untimed step of the same side for ours vs "
                       "torch) so that they share the machine's drift; load average "
                       "(1/5/15 min) before/after each comparison in load_tiny / load_50m")
    extra["load_run"] = {"before": load_start, "after": load_average()}
    extra["note"] = ("ours: CE + balance-free step with AdamW (masked decay), clipping, "
                     "donated state; tiny rows include balance loss and bias update")
    extra["profile_before"] = PROFILE_BEFORE
    if "--no-profile" not in sys.argv:
        extra["profile_after"] = profile_step(model, tc, batch)
    write_results("train_step", "Training step: tokens/s, MFU, MTP cost, vs transformers (CPU)",
                  ["config", "params", "batch", "ms / step", "tokens/s", "MFU", "ratio",
                   "compile s"], rows, extra)


if __name__ == "__main__":
    ensure_huge_page_malloc()  # as the `mimo-jax` command does (mimo_jax.core.host_memory)
    main()
