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
Ours runs the production step: donated state, threaded from step to step.
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
from common import interleaved_runs, load_average, write_results  # noqa: E402

import mimo_jax  # noqa: E402
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
    times, extra["load_tiny"] = _timed(runners, TINY_REPEATS)
    tokens = tiny.batch_size * tiny.seq_len
    for n_mtp, s in times.items():
        mfu = flops_per_token(cfgs[n_mtp], tiny.seq_len) * tokens / s / peak
        n_params = mimo_jax.param_count(cfgs[n_mtp]).total_with_mtp
        rows.append([f"tiny-cpu, {n_mtp} MTP", f"{n_params / 1e6:.2f}M",
                     f"{tiny.batch_size}x{tiny.seq_len}", f"{s * 1e3:.0f}", f"{tokens / s:,.0f}",
                     f"{100 * mfu:.1f}%", f"{s / times[0]:.2f}x vs 0 MTP",
                     f"{compile_s[n_mtp]:.0f}"])
        print(rows[-1], flush=True)
    extra["mtp_1_head_ratio"] = round(times[1] / times[0], 3)
    # The step-time ratio at equal MFU: below it, the head runs more efficiently than the body.
    for n in (1, 3):
        extra[f"mtp_{n}_head_flop_ratio"] = round(
            flops_per_token(cfgs[n], tiny.seq_len) / flops_per_token(cfgs[0], tiny.seq_len), 3)
    extra["mtp_goal"] = "<= 1.20x step time for one MTP head"

    # 2. ~50M config: ours (no MTP) vs transformers eager, same weights and batch
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    torch.manual_seed(0)
    hf = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**HF_CONFIG))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = mimo_jax.load(d, dtype="float32")
    cfg = model.cfg
    tc = TrainConfig(batch_size=BIG_BATCH, seq_len=BIG_SEQ, lr=1e-4, warmup_steps=0,
                     balance_coef=0.0, bias_gamma=0.0)
    batch = _batch(BIG_BATCH, BIG_SEQ, HF_CONFIG["vocab_size"])
    ours_run, c = our_step_runner(model, tc, batch)
    tokens = BIG_BATCH * BIG_SEQ

    hf.train()
    impls = {"attn_implementation": hf.config._attn_implementation,
             "experts_implementation": getattr(hf.config, "_experts_implementation", None)}
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(np.asarray(batch["ids"]).astype(np.int64))

    def torch_step(experts: str):
        def run():
            hf.config._experts_implementation = experts
            loss = hf(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    # transformers' default experts kernel on this CPU is torch grouped_mm; its "eager"
    # per-expert loop is timed too, and the faster of the two is the baseline. The first
    # (untimed) round allocates the optimizer state.
    default = impls["experts_implementation"]
    times, extra["load_50m"] = _timed({"ours": ours_run, **{
        k: torch_step(k) for k in dict.fromkeys([default, "eager"])}}, settle=1)
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
    ref_mfu = flops_per_token(cfg, BIG_SEQ) * tokens / ref_s / peak
    rows.append(["~50M, transformers eager", f"{n_params / 1e6:.1f}M", f"{BIG_BATCH}x{BIG_SEQ}",
                 f"{ref_s * 1e3:.0f}", f"{tokens / ref_s:,.0f}", f"{100 * ref_mfu:.1f}%",
                 "1.00x", "-"])
    extra["speedup_vs_transformers"] = round(ref_s / ours_s, 2)
    # The ratio at 100% of the measured 1024^2 matmul peak: about the most any step can reach.
    extra["speedup_at_measured_peak"] = round(1 / ref_mfu, 2)
    extra["transformers_goal"] = ">= 2x faster than transformers eager"
    extra["mfu_goal"] = ">= 50% of the measured f32 matmul peak"
    extra["torch_threads"] = torch.get_num_threads()
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
    main()
