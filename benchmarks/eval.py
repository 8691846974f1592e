"""lm-eval loglikelihood throughput: the `mimo-jax` backend against lm-eval's `hf` backend.

    .venv/bin/python benchmarks/eval.py [--requests 64] [--repeats 5] [--quick]

Same checkpoint for both: a ~50M-parameter random MiMo (the config of benchmarks/forward.py:
8 layers, 32 experts top-4, vocab 16384), written with transformers' save_pretrained next to
a byte-level BPE tokenizer trained here on Python stdlib sources. Same requests for both:
distinct (context, continuation) pairs cut from stdlib text, contexts 100..2000 characters
and continuations 10..120 characters, float32, max_length 1024. Each side is warmed up with
one full pass (for mimo-jax: compiling one program per bucket, timed and reported
separately), then timed end to end (`lm.loglikelihood(requests)`: tokenisation, batching,
forward, scoring) over `--repeats` runs; the median is reported. hf runs with batch_size 16
(its requests sorted by length, so little padding); mimo-jax packs rows of 64..1024 tokens
with batch_size auto (~16k tokens per batch). The load average is recorded before and after
(the machine may be shared). Goal (issue 13): >= 3x the hf backend.
Writes benchmarks/results/eval.{md,json}.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MIN_REPEATS, QUICK, time_runs, write_results  # noqa: E402

HF_CONFIG = dict(vocab_size=16384, hidden_size=384, intermediate_size=1024,
                 moe_intermediate_size=160, num_hidden_layers=8, num_attention_heads=6,
                 num_key_value_heads=1, head_dim=96, v_head_dim=64, n_routed_experts=32,
                 num_experts_per_tok=4, sliding_window=129, max_position_embeddings=4096)
MAX_LENGTH = 1024
HF_BATCH = 16
EOS = "<|endoftext|>"


def stdlib_text(limit: int = 3_000_000) -> str:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)[:limit]


def build_checkpoint(directory: str, text: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(directory)
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**HF_CONFIG, eos_token_id=0)).eval()
    model.save_pretrained(directory)


def make_requests(text: str, n: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ctx_len = int(rng.integers(100, 2000))
        start = int(rng.integers(0, len(text) - ctx_len - 200))
        cut = text.find(" ", start + ctx_len)
        cont_len = int(rng.integers(10, 120))
        out.append(Instance("loglikelihood", {}, (text[start:cut], text[cut:cut + cont_len]), i))
    return out


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, repeats: int) -> list[float]:
    """max(repeats, 5) timed runs; the caller has already run `fn` once as the warm-up."""
    return time_runs(fn, repeats, warmup=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="24 requests (smoke test)")
    args = ap.parse_args()
    if args.quick or QUICK:
        args.requests = 24
    args.repeats = max(args.repeats, MIN_REPEATS)

    from lm_eval.models.huggingface import HFLM

    from mimo_jax.eval.lm_backend import MimoLM
    from mimo_jax.model.shapes import param_count

    load_before = load_avg()
    text = stdlib_text()
    requests = make_requests(text, args.requests)
    with tempfile.TemporaryDirectory() as d:
        build_checkpoint(d, text)
        ours = MimoLM(pretrained=d, dtype="float32", max_length=MAX_LENGTH, progress=False)
        hf = HFLM(pretrained=d, max_length=MAX_LENGTH, batch_size=HF_BATCH, device="cpu",
                  dtype="float32")

        t0 = time.perf_counter()
        ours_first = ours.loglikelihood(requests, disable_tqdm=True)
        warm_s = time.perf_counter() - t0
        compile_s = ours.scorer.stats.compile_seconds
        compiles = dict(ours.scorer.stats.compilations_by_bucket)
        hf_first = hf.loglikelihood(requests, disable_tqdm=True)  # warm-up
        ours_times = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True), args.repeats)
        hf_times = timed(lambda: hf.loglikelihood(requests, disable_tqdm=True), args.repeats)
        assert ours.scorer.stats.compilations == sum(compiles.values()), "recompiled"

    lp_ours = np.array([x[0] for x in ours_first])
    lp_hf = np.array([x[0] for x in hf_first])
    rel = float(np.max(np.abs(lp_ours - lp_hf) / np.maximum(np.abs(lp_hf), 1e-9)))
    greedy_same = sum(a[1] == b[1] for a, b in zip(ours_first, hf_first, strict=True))
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
    n = len(requests)
    stats = ours.scorer.stats
    per_run = stats.as_dict()
    counts = param_count(ours.model.cfg)
    rows = [
        ["mimo-jax (packed, jit)", f"{n / ours_s:.1f}", f"{ours_s:.2f}",
         f"{min(ours_times):.2f}-{max(ours_times):.2f}", f"{hf_s / ours_s:.2f}x"],
        [f"lm-eval hf (batch {HF_BATCH})", f"{n / hf_s:.1f}", f"{hf_s:.2f}",
         f"{min(hf_times):.2f}-{max(hf_times):.2f}", "1.00x"],
    ]
    runs = 1 + args.repeats
    write_results(
        "eval", "lm-eval loglikelihood: mimo-jax backend vs lm-eval's hf backend (float32, CPU)",
        ["backend", "requests/s", "median s / pass", "range s", "speedup"], rows,
        {"config": f"{counts.total / 1e6:.1f}M params, 8 layers, 32 experts top-4, vocab "
                   f"16384; {n} distinct requests, contexts 100-2000 chars, max_length "
                   f"{MAX_LENGTH}; median of {args.repeats} timed passes after a warm-up pass",
         "speedup": round(hf_s / ours_s, 2),
         "goal": ">= 3x lm-eval's hf backend",
         "mimo_jax_compile_seconds": round(compile_s, 2),
         "mimo_jax_compilations_by_bucket": {str(k): v for k, v in compiles.items()},
         "mimo_jax_first_pass_seconds_incl_compile": round(warm_s, 2),
         "mimo_jax_padding_fraction": per_run["padding_fraction"],
         "mimo_jax_batches_per_pass": stats.batches // runs,
         "mimo_jax_tokens_per_pass": stats.tokens // runs,
         "max_rel_logprob_diff": rel, "is_greedy_agree": f"{greedy_same}/{n}",
         "torch_threads": torch.get_num_threads(),
         "load_average_before": load_before, "load_average_after": load_avg(),
         "ours_seconds": [round(t, 3) for t in ours_times],
         "hf_seconds": [round(t, 3) for t in hf_times]},
    )


if __name__ == "__main__":
    main()
