"""Forward tokens/s: our jitted model against transformers eager, same config and weights.

Config: ~50M parameters, 8 layers, 32 experts top-4, sequence 1024, float32 on CPU.
Goal (issue 2): ours at least 3x faster. Every side: one warm-up call, then the median of
REPEATS calls, the sides interleaved (one call of each per round, so a drifting shared machine
slows all alike); the load average before/after, torch's thread count, the transformers
attention / experts implementations (its defaults on this CPU) and the MFU of each side
against the measured f32 matmul peak are recorded. Transformers runs in a child process
(`common.ChildProcess`) with glibc's default malloc, ours in another with the default malloc
too (as `mimo-jax generate` / `eval` run), and a third side times ours with huge-page malloc
(what `mimo-jax train` uses, mimo_jax.core.host_memory). The parent only checks the logits.
Run: .venv/bin/python benchmarks/forward.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import jax
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
from mimo_jax.core.host_memory import with_huge_pages, without_huge_pages  # noqa: E402
from mimo_jax.train.metrics import flops_per_token, peak_flops_per_device  # noqa: E402

HF_CONFIG = dict(vocab_size=16384, hidden_size=384, intermediate_size=1024,
                 moe_intermediate_size=160, num_hidden_layers=8, num_attention_heads=6,
                 num_key_value_heads=1, head_dim=96, v_head_dim=64, n_routed_experts=32,
                 num_experts_per_tok=4, sliding_window=129, max_position_embeddings=4096)
BATCH, SEQ = 2, 1024
REPEATS = 7


def transformers_sides(model_dir: str, ids: list) -> tuple[dict, dict]:
    """For `common.ChildProcess`: a no-grad transformers forward of the model saved in
    `model_dir` on `ids`, one side per experts kernel: its default on this CPU (torch
    grouped_mm) and the "eager" per-expert loop (the faster is the baseline)."""
    from transformers import MiMoV2FlashForCausalLM

    hf = MiMoV2FlashForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids_t = torch.tensor(ids, dtype=torch.int64)

    def torch_forward(experts: str):
        def run():
            hf.config._experts_implementation = experts
            with torch.no_grad():
                hf(ids_t)
        return run

    default = hf.config._experts_implementation
    return ({k: torch_forward(k) for k in dict.fromkeys([default, "eager"])},
            {"attn_implementation": hf.config._attn_implementation,
             "torch_threads": torch.get_num_threads(),
             "malloc": malloc_setting()})


def ours_sides(model_dir: str, ids: list) -> tuple[dict, dict]:
    """For `common.ChildProcess`: our jitted forward as in `main`, in a process whose
    environment picks the malloc."""
    model = mimo_jax.load(model_dir, dtype="float32")
    forward = nnx.jit(lambda m, x: m(x, compute_mtp=False).logits)
    x = jax.numpy.asarray(np.asarray(ids, np.int32))
    jax.block_until_ready(forward(model, x))
    return ({"ours": lambda: jax.block_until_ready(forward(model, x))},
            {"malloc": malloc_setting()})


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
        with torch.no_grad():
            ref = hf(ids).logits.numpy()

        # Every side in its own child process (a process's position, parent or child, moved
        # this forward's time by ~10% here): transformers with glibc's default malloc, as its
        # users run it; ours with the default malloc too, as `mimo-jax generate` / `eval` run,
        # and with huge-page malloc, as `mimo-jax train` runs (for what that changes).
        load_before = load_average()
        args, env = {"model_dir": d, "ids": ids.tolist()}, without_huge_pages(os.environ)
        with ChildProcess("forward:transformers_sides", args, env=env) as child, \
                ChildProcess("forward:ours_sides", args, env=env) as ours_child, \
                ChildProcess("forward:ours_sides", args,
                             env=with_huge_pages(env) or env) as huge:
            times = interleaved_runs({
                "ours": ours_child.side("ours"), "ours_huge_pages": huge.side("ours"),
                **{k: child.side(k) for k in child.sides}}, REPEATS, settle=1)
        load_after = load_average()
    times = {k: statistics.median(v) for k, v in times.items()}
    ours_s = times.pop("ours")
    ours_huge_s = times.pop("ours_huge_pages")
    by_impl = {k: round(v * 1e3) for k, v in times.items()}
    best_impl = min(times, key=times.get)
    ref_s = times[best_impl]
    max_diff = float(np.abs(np.asarray(ours) - ref).max())

    tokens = BATCH * SEQ
    # Model FLOPs of one forward (training FLOPs / 3) against the measured f32 matmul peak.
    peak, how = peak_flops_per_device()
    fwd_flops = flops_per_token(model.cfg, SEQ, num_mtp=0) / 3 * tokens
    mfu = {"ours": fwd_flops / ours_s / peak, "transformers": fwd_flops / ref_s / peak}
    rows = [
        ["mimo-jax (jit)", f"{ours_s * 1e3:.0f}", f"{tokens / ours_s:,.0f}",
         f"{ref_s / ours_s:.2f}x"],
        ["mimo-jax (jit), huge-page malloc", f"{ours_huge_s * 1e3:.0f}",
         f"{tokens / ours_huge_s:,.0f}", f"{ref_s / ours_huge_s:.2f}x"],
        ["transformers eager", f"{ref_s * 1e3:.0f}", f"{tokens / ref_s:,.0f}", "1.00x"],
    ]
    write_results(
        "forward", "Forward pass: mimo-jax vs transformers 5.23 (float32, CPU)",
        ["implementation", "ms / forward", "tokens/s", "speedup"], rows,
        {"config": f"{counts.total / 1e6:.1f}M params, 8 layers, 32 experts top-4, "
                   f"batch {BATCH} x seq {SEQ}",
         "compile_seconds": round(compile_s, 2), "speedup": round(ref_s / ours_s, 2),
         "huge_page_malloc_speedup": round(ours_s / ours_huge_s, 3),
         "peak_flops": f"{peak / 1e9:.1f} GFLOP/s ({how})",
         "mfu": {k: round(v, 3) for k, v in mfu.items()},
         # "speedup" at 100% of the measured 1024^2 matmul peak: about the most reachable
         "speedup_at_measured_peak": round(1 / mfu["transformers"], 2),
         "goal": ">= 3x faster than transformers eager", "max_abs_logit_diff": max_diff,
         "torch_threads": child.info["torch_threads"],
         "malloc": {"ours": ours_child.info["malloc"], "ours_huge_pages": huge.info["malloc"],
                    "transformers": child.info["malloc"]},
         "transformers_impl": {
             "attn_implementation": child.info["attn_implementation"],
             "experts_implementation": f"{best_impl} (faster of {sorted(by_impl)})"},
         "transformers_ms_by_experts_impl": by_impl,
         "timing": f"median of {REPEATS} calls after one warm-up call, every side, in "
                   "interleaved rounds (per round and side one untimed, then one timed call)",
         "load": {"before": load_before, "after": load_after}},
    )


if __name__ == "__main__":
    main()
