"""Training-step speed: tokens/s and MFU, the cost of MTP heads, and ours vs transformers.

In one run on this machine:
1. the tiny-cpu preset (its model, batch and sequence) with 0, 1 and 3 MTP heads: tokens/s,
   MFU estimate, and step time relative to no MTP head (goal: <= 1.25x for one head);
2. a ~50M-parameter config (8 layers, 32 experts top-4, batch 2 x 512): tokens/s and MFU,
   and a transformers 5.23 training step (torch eager `MiMoV2FlashForCausalLM`, same weights,
   same batch, CE loss + AdamW + clipping; no MTP heads since transformers has none) against
   ours with no MTP head (goal: ours >= 2x faster).
MFU = model FLOPs (mimo_jax.train.metrics.flops_per_token) / measured peak f32 matmul FLOP/s.
Run: .venv/bin/python benchmarks/train_step.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds, write_results  # noqa: E402

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


def time_our_step(model, tc, batch, repeats=3):
    cfg = model.cfg
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tc, cfg, tx)
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, other, opt_state, batch, jnp.int32(0)))
    compile_s = time.perf_counter() - t0
    s = median_seconds(
        lambda: jax.block_until_ready(step(params, other, opt_state, batch, jnp.int32(0))),
        repeats=repeats)
    return s, compile_s


def main() -> None:
    peak, how = peak_flops_per_device()
    rows, extra = [], {"peak_flops": f"{peak / 1e9:.1f} GFLOP/s ({how})"}

    # 1. tiny-cpu preset, MTP heads 0 / 1 / 3
    tiny = TrainConfig.preset("tiny-cpu")
    times = {}
    for n_mtp in (0, 1, 3):
        tc = tiny.override({"model.num_mtp_layers": n_mtp})
        cfg = tc.model_config()
        model = mimo_jax.MiMo(cfg, rngs=nnx.Rngs(0))
        batch = _batch(tc.batch_size, tc.seq_len, 259)
        s, c = time_our_step(model, tc, batch)
        times[n_mtp] = s
        tokens = tc.batch_size * tc.seq_len
        mfu = flops_per_token(cfg, tc.seq_len) * tokens / s / peak
        n_params = mimo_jax.param_count(cfg).total_with_mtp
        rows.append([f"tiny-cpu, {n_mtp} MTP", f"{n_params / 1e6:.2f}M",
                     f"{tc.batch_size}x{tc.seq_len}", f"{s * 1e3:.0f}", f"{tokens / s:,.0f}",
                     f"{100 * mfu:.1f}%", f"{s / times[0]:.2f}x vs 0 MTP", f"{c:.0f}"])
        print(rows[-1], flush=True)
    extra["mtp_1_head_ratio"] = round(times[1] / times[0], 3)
    extra["mtp_3_head_ratio"] = round(times[3] / times[0], 3)
    extra["mtp_goal"] = "<= 1.25x step time for one MTP head"

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
    ours_s, c = time_our_step(model, tc, batch)
    tokens = BIG_BATCH * BIG_SEQ
    mfu = flops_per_token(cfg, BIG_SEQ) * tokens / ours_s / peak

    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(np.asarray(batch["ids"]).astype(np.int64))

    def torch_step():
        loss = hf(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch_step()
    ref_s = median_seconds(torch_step, repeats=3)
    n_params = mimo_jax.param_count(cfg).total
    rows.append(["~50M, 0 MTP (ours, jit)", f"{n_params / 1e6:.1f}M", f"{BIG_BATCH}x{BIG_SEQ}",
                 f"{ours_s * 1e3:.0f}", f"{tokens / ours_s:,.0f}", f"{100 * mfu:.1f}%",
                 f"{ref_s / ours_s:.2f}x vs torch", f"{c:.0f}"])
    ref_mfu = flops_per_token(cfg, BIG_SEQ) * tokens / ref_s / peak
    rows.append(["~50M, transformers eager", f"{n_params / 1e6:.1f}M", f"{BIG_BATCH}x{BIG_SEQ}",
                 f"{ref_s * 1e3:.0f}", f"{tokens / ref_s:,.0f}", f"{100 * ref_mfu:.1f}%",
                 "1.00x", "-"])
    extra["speedup_vs_transformers"] = round(ref_s / ours_s, 2)
    extra["transformers_goal"] = ">= 2x faster than transformers eager"
    extra["torch_threads"] = torch.get_num_threads()
    extra["note"] = ("ours: CE + balance-free step with AdamW (masked decay), clipping; "
                     "tiny rows include balance loss and bias update")
    write_results("train_step", "Training step: tokens/s, MFU, MTP cost, vs transformers (CPU)",
                  ["config", "params", "batch", "ms / step", "tokens/s", "MFU", "ratio",
                   "compile s"], rows, extra)


if __name__ == "__main__":
    main()
