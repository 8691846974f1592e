"""`mimo-jax demo [--workdir DIR] [--minutes M]`: the main job, end to end on a CPU.

1. Train a byte-level BPE tokenizer on the training side of the corpus (the Python standard
   library's own sources) and save it as WORKDIR/tokenizer.json (reused when present).
2. Train the tiny-cpu MiMo with it for M minutes (a rerun resumes from the checkpoint).
3. Reload the saved checkpoint as a user would, and on held-out files measure perplexity,
   bits per byte, and how many MTP drafts a K-head speculation would accept (teacher-forced).
4. Generate greedy and sampled continuations of a few code prompts, plain and with MTP
   speculative decoding (tokens/s), and print a summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

from mimo_jax.commands.common import fail
from mimo_jax.core import logs

# Prompts end at a non-space character: byte-level BPE merges a newline with the indentation
# after it ("\n   "), so a prompt ending in a bare "\n" would end in a token that the training
# text only has before column-0 lines, and the model would continue with blank lines.
PROMPTS = (
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\n\ndef read_lines(path):",
)
EVAL_ROWS = 256  # held-out rows (of seq_len tokens) for perplexity and MTP acceptance
SAMPLE_LINES = 6  # lines of each continuation shown
CPU_MFU = 0.24  # the tiny-cpu preset's measured model FLOPs utilisation on a CPU
COMPILE_S = 15.0  # the training step's compilation, inside the time budget


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train a tiny MiMo on the Python stdlib for a few minutes, then sample",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default="runs/demo", help="default: runs/demo")
    p.add_argument("--minutes", type=float, default=4.0, help="training time (default 4)")
    p.add_argument("--vocab-size", type=int, default=1024,
                   help="BPE vocabulary when the tokenizer is trained (default 1024)")
    p.add_argument("--tokenizer-mb", type=float, default=8.0,
                   help="MB of training text the tokenizer learns from (default 8)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt to continue (repeatable; default: three code prompts)")
    p.add_argument("--sample-tokens", type=int, default=48, help="new tokens per sample")
    p.add_argument("--speculative", type=int, default=3, help="MTP draft length (default 3)")
    p.add_argument("--eval-rows", type=int, default=EVAL_ROWS,
                   help=f"held-out rows scored (default {EVAL_ROWS})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training setting, as for `mimo-jax train` (e.g. data.source=DIR)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- tokenizer
def prepare_tokenizer(workdir: str, data: Any, vocab_size: int, max_mb: float) -> dict[str, Any]:
    """WORKDIR/tokenizer.json: reused when present, else a byte-level BPE trained on the
    training documents of `data` (a DataConfig; the held-out ones stay unseen), at most
    `max_mb` MB of them, spread over the corpus. Returns its spec plus "trained" (seconds or
    None) and "bytes_per_token" (on the text it saw, or None)."""
    from mimo_jax.data.bpe import bpe_spec, train_bpe_tokenizer
    from mimo_jax.data.pipeline import split_documents
    from mimo_jax.data.sources import open_source

    path = os.path.join(workdir, "tokenizer.json")
    if os.path.isfile(path):
        return {"spec": bpe_spec(path), "trained": None, "bytes_per_token": None}
    docs = open_source(data.source, data.kind, data.field)
    train_ids = split_documents(len(docs), data.val_fraction, data.seed).train
    budget = int(max_mb * 1e6)
    stride = max(1, len(train_ids) // 400)  # visit the corpus evenly, not alphabetically
    order = [i for s in range(stride) for i in train_ids[s::stride]]
    texts, seen = [], 0
    for i in order:
        text = docs[i]
        size = len(text.encode("utf-8"))
        if seen + size > budget and texts:
            break
        texts.append(text)
        seen += size
    t0 = time.perf_counter()
    spec = train_bpe_tokenizer(texts, path, vocab_size=vocab_size)
    seconds = time.perf_counter() - t0
    from mimo_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    sample = texts[: max(1, len(texts) // 20)]
    n_tokens = sum(len(tok.encode(t)) for t in sample)
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    return {"spec": spec, "trained": seconds, "bytes_per_token": n_bytes / max(n_tokens, 1),
            "documents": len(texts), "mb": seen / 1e6}


# ----------------------------------------------------------------------------- schedule
def latest_step(workdir: str) -> int:
    """The newest checkpoint step in WORKDIR/checkpoints (0 when there is none)."""
    ckpts = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if d.isdigit()]
    return max(steps, default=0)


def planned_steps(tc: Any, minutes: float) -> int:
    """Optimizer steps `minutes` of training allow on this machine: FLOPs per step over a
    measured matmul rate at the utilisation the tiny model reaches on a CPU. The cosine decay
    is planned to end there; the time limit stays the hard stop."""
    from mimo_jax.train.metrics import flops_per_token, peak_flops_per_device

    peak, _ = peak_flops_per_device()
    step_flops = flops_per_token(tc.model_config(), tc.seq_len) * tc.batch_size * tc.seq_len
    return max(1, int((minutes * 60.0 - COMPILE_S) * peak * CPU_MFU / step_flops))


def schedule(tc: Any, minutes: float, start: int, steps: int | None = None) -> dict[str, Any]:
    """Settings for `minutes` more training from step `start` (or up to `steps`, when given):
    warmup, constant, then a cosine decay to `end_lr` that ends when the time is up (a short
    run gains most from ending at a low learning rate). A rerun continues from `start` with a
    new decay."""
    if minutes <= 0 and steps is None:
        return {"steps": start}  # no training: evaluate and sample the checkpoint
    planned = planned_steps(tc, minutes) if steps is None else max(steps - start, 0)
    steps = start + planned
    decay = max(0, min(planned, steps - tc.warmup_steps))
    return {"steps": steps, "decay_steps": decay, "time_limit_minutes": minutes}


# ----------------------------------------------------------------------------- output
def _continuation(text: str, max_lines: int) -> str:
    lines = text.split("\n")
    shown = "\n".join(lines[:max_lines])
    return shown + ("\n[...]" if len(lines) > max_lines else "")


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column plain-text table."""
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    return f"{rule}\n{body}\n{rule}"


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------- the job
@dataclasses.dataclass
class _Decode:
    plain: Any
    spec: Any
    sampled: Any


def _decode_runs(model, tok, prompts: list[str], new_tokens: int, k: int) -> _Decode:
    import mimo_jax

    def gen(**kw):
        # The first call compiles; the reported speed is of the second.
        mimo_jax.generate(model, prompts, tokenizer=tok, max_new_tokens=new_tokens, **kw)
        return mimo_jax.generate(model, prompts, tokenizer=tok, max_new_tokens=new_tokens, **kw)

    plain = gen()
    spec = gen(speculative=k) if k else None
    sampled = mimo_jax.generate(model, prompts, tokenizer=tok, max_new_tokens=new_tokens,
                                temperature=0.8, top_p=0.95, seed=0)
    return _Decode(plain, spec, sampled)


def run(args: argparse.Namespace) -> int:
    import mimo_jax
    from mimo_jax.core.errors import CheckpointError
    from mimo_jax.data import DataError, load_tokenizer
    from mimo_jax.eval import Corpus, mtp_acceptance, perplexity
    from mimo_jax.train import TrainConfig, train

    t_start = time.perf_counter()
    workdir = args.workdir
    prompts = list(args.prompt or PROMPTS)
    try:
        tc = TrainConfig.preset("tiny-cpu").override({"val_every": 100}).override(
            args.overrides)
        tok_info = None
        if not any(o.split("=", 1)[0].strip() == "data.tokenizer" for o in args.overrides):
            os.makedirs(workdir, exist_ok=True)
            tok_info = prepare_tokenizer(workdir, tc.data, args.vocab_size, args.tokenizer_mb)
            spec = tok_info["spec"]
            vocab = load_tokenizer(spec).vocab_size
            tc = tc.override({"data.tokenizer": spec, "model.vocab_size": vocab})
            if tok_info["trained"] is not None:
                logs.info(
                    f"tokenizer: byte-level BPE, {vocab} ids, trained in "
                    f"{tok_info['trained']:.1f}s on {tok_info['mb']:.1f} MB "
                    f"({tok_info['documents']} training files): "
                    f"{tok_info['bytes_per_token']:.2f} bytes/token -> {spec['path']}")
            else:
                logs.info(f"tokenizer: reusing {spec['path']} ({vocab} ids)")
        given = {o.split("=", 1)[0].strip() for o in args.overrides}
        plan = schedule(tc, args.minutes, latest_step(workdir),
                        steps=tc.steps if "steps" in given else None)
        plan = {k: v for k, v in plan.items() if k not in given}
        tc = tc.override(plan)
        t_train = time.perf_counter()
        result = train(tc, workdir)
        train_s = time.perf_counter() - t_train

        # Everything below uses the saved checkpoint, as a user would.
        model = mimo_jax.load(workdir)
        tok = load_tokenizer(tc.data.tokenizer)
        held_out = Corpus.from_data_config(tc.data, split="val")
        ppl = perplexity(model, held_out, tokenizer=tok, seq_len=tc.seq_len,
                         batch_size=16, max_rows=args.eval_rows)
        k = min(args.speculative, len(model.mtp))
        acc = (mtp_acceptance(model, held_out, tokenizer=tok, seq_len=tc.seq_len,
                              batch_size=16, max_rows=args.eval_rows) if len(model.mtp) else None)
        runs = _decode_runs(model, tok, prompts, args.sample_tokens, k)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        return fail("demo", e)

    for i, prompt in enumerate(prompts):
        for name, out in (("greedy", runs.plain), ("sampled, T=0.8, top-p 0.95", runs.sampled)):
            print(f"--- prompt {i + 1}/{len(prompts)}, {name} ---")
            print(prompt + _continuation(out.text[i], SAMPLE_LINES))
    if runs.spec is not None and runs.spec.tokens != runs.plain.tokens:
        print("warning: speculative greedy tokens differ from plain greedy", file=sys.stderr)

    losses = result.losses
    last = losses[-min(len(losses), 20):]
    tokens_per_step = tc.batch_size * tc.seq_len
    rows = [
        ("steps", f"{result.step} (this run {result.start_step}..{result.step}, "
                  f"{train_s / 60:.1f} min, stopped by {result.stopped_by})"),
        ("tokens seen", f"{_fmt_count(result.step * tokens_per_step)} "
                        f"({tokens_per_step} per step, ~{_bytes_per_token(ppl):.1f} bytes each)"),
        ("train loss", f"{sum(last) / len(last):.3f} (mean of the last {len(last)} steps)"
         if last else "no steps this run"),
        ("validation loss", "n/a" if result.val_loss is None else
         f"{result.val_loss:.3f} (the training run's held-out batches)"),
        ("held-out perplexity", f"{ppl.perplexity:.2f} per token, on {_fmt_count(ppl.tokens)} "
                                f"tokens of files never trained on"),
        ("bits per byte", f"{ppl.bits_per_byte:.3f}" if ppl.bits_per_byte else "n/a"),
    ]
    if acc is not None:
        lengths = "  ".join(f"K={j + 1}: {x:.2f}" for j, x in enumerate(acc.acceptance_length))
        accepted = ", ".join(f"{_pct(r)}" for r in acc.acceptance_rate)
        given = ", ".join(f"{j + 2}|{j + 1}: {_pct(c)}"
                          for j, c in enumerate(acc.conditional_rate[1:]))
        rows += [
            ("MTP acceptance length", f"{lengths} (teacher-forced, held-out; at most K+1)"),
            ("MTP drafts accepted", f"{accepted} of rounds for drafts 1..{acc.num_heads}"
                                    + (f" (given the previous: {given})" if given else "")),
            ("next-token entropy", f"{acc.mean_entropy:.2f} nats (held-out mean)"),
        ]
    if runs.spec is not None:
        rows += [("decode tokens/s",
                  f"plain {runs.plain.tokens_per_second:.0f}, MTP K={k} "
                  f"{runs.spec.tokens_per_second:.0f} "
                  f"({runs.spec.tokens_per_second / runs.plain.tokens_per_second:.2f}x; "
                  f"acceptance {runs.spec.acceptance_length:.2f} on its own output)")]
    else:
        rows += [("decode tokens/s", f"plain {runs.plain.tokens_per_second:.0f}")]
    rows += [
        ("samples", f"{len(prompts)} prompts x (greedy, sampled), "
                    f"{args.sample_tokens} new tokens each (above)"),
        ("tokenizer", f"{tc.data.tokenizer.get('path', tc.data.tokenizer.get('kind'))}"),
        ("checkpoint", os.path.join(workdir, "checkpoints", str(result.step))),
        ("total time", f"{(time.perf_counter() - t_start) / 60:.1f} min"),
    ]
    print("summary")
    print(summary_table(rows))
    print(f"try: mimo-jax generate --checkpoint {workdir} --prompt 'def main():' --speculative {k}")
    return 0


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.0%}"  # NaN: no position reached this draft


def _bytes_per_token(ppl) -> float:
    return ppl.bytes / max(ppl.tokens, 1)


def main(argv: list[str] | None = None) -> int:
    """`python -m mimo_jax.commands.demo ...` (same arguments as `mimo-jax demo`)."""
    parser = argparse.ArgumentParser(prog="mimo-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
