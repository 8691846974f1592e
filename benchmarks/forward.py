"""Forward tokens/s: our jitted model against transformers eager, same config and weights.

Config: ~50M parameters, 8 layers, 32 experts top-4, sequence 1024, float32 on CPU.
Goal (issue 2): ours at least 3x faster. Both sides: one warm-up call, then the median of
REPEATS calls; load average before/after each side, torch's thread count and the transformers
attention / experts implementations (its defaults on this CPU) are recorded.
Run: .venv/bin/python benchmarks/forward.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds, write_results  # noqa: E402

import mimo_jax  # noqa: E402

HF_CONFIG = dict(vocab_size=16384, hidden_size=384, intermediate_size=1024,
                 moe_intermediate_size=160, num_hidden_layers=8, num_attention_heads=6,
                 num_key_value_heads=1, head_dim=96, v_head_dim=64, n_routed_experts=32,
                 num_experts_per_tok=4, sliding_window=129, max_position_embeddings=4096)
BATCH, SEQ = 2, 1024
REPEATS = 5


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    torch.manual_seed(0)
    hf = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**HF_CONFIG)).eval()
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (BATCH, SEQ))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = mimo_jax.load(d, dtype="float32")
    counts = mimo_jax.param_count(model.cfg)

    forward = nnx.jit(lambda m, x: m(x, compute_mtp=False).logits)
    x = jax.numpy.asarray(ids.numpy())
    t0 = time.perf_counter()
    ours = jax.block_until_ready(forward(model, x))
    compile_s = time.perf_counter() - t0
    load_ours = [_load()]
    ours_s = median_seconds(lambda: jax.block_until_ready(forward(model, x)), repeats=REPEATS)
    load_ours.append(_load())

    with torch.no_grad():
        ref = hf(ids).logits.numpy()  # also the warm-up
        load_ref = [_load()]
        ref_s = median_seconds(lambda: hf(ids), repeats=REPEATS)
        load_ref.append(_load())
        # Default experts kernel (grouped_mm) vs the "eager" loop: compare with the faster.
        default_impl = hf.config._experts_implementation
        hf.config._experts_implementation = "eager"
        hf(ids)
        eager_s = median_seconds(lambda: hf(ids), repeats=REPEATS)
        hf.config._experts_implementation = default_impl
    by_impl = {default_impl: round(ref_s * 1e3), "eager": round(eager_s * 1e3)}
    best_impl = default_impl if ref_s <= eager_s else "eager"
    ref_s = min(ref_s, eager_s)
    max_diff = float(np.abs(np.asarray(ours) - ref).max())

    tokens = BATCH * SEQ
    rows = [
        ["mimo-jax (jit)", f"{ours_s * 1e3:.0f}", f"{tokens / ours_s:,.0f}",
         f"{ref_s / ours_s:.2f}x"],
        ["transformers eager", f"{ref_s * 1e3:.0f}", f"{tokens / ref_s:,.0f}", "1.00x"],
    ]
    write_results(
        "forward", "Forward pass: mimo-jax vs transformers 5.23 (float32, CPU)",
        ["implementation", "ms / forward", "tokens/s", "speedup"], rows,
        {"config": f"{counts.total / 1e6:.1f}M params, 8 layers, 32 experts top-4, "
                   f"batch {BATCH} x seq {SEQ}",
         "compile_seconds": round(compile_s, 2), "speedup": round(ref_s / ours_s, 2),
         "goal": ">= 3x faster than transformers eager", "max_abs_logit_diff": max_diff,
         "torch_threads": torch.get_num_threads(),
         "transformers_impl": {
             "attn_implementation": hf.config._attn_implementation,
             "experts_implementation": f"{best_impl} (faster of {sorted(by_impl)})"},
         "transformers_ms_by_experts_impl": by_impl,
         "timing": f"median of {REPEATS} calls after one warm-up call, both sides",
         "load_ours": {"before": load_ours[0], "after": load_ours[1]},
         "load_transformers": {"before": load_ref[0], "after": load_ref[1]}},
    )


if __name__ == "__main__":
    main()
