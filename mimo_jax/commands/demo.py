"""`mimo-jax demo [--workdir DIR] [--minutes M]`: train the tiny-cpu preset on the Python
standard library's own source files for a few minutes, save a checkpoint, report validation
perplexity, then reload the checkpoint and generate from it, with and without MTP speculative
decoding (acceptance length and speedup). Running it again continues training."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "import os\n\n\ndef "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train a tiny MiMo on the Python stdlib for a few minutes", description=__doc__
    )
    p.add_argument("--workdir", default="runs/demo", help="default: runs/demo")
    p.add_argument("--minutes", type=float, default=3.5, help="training time (default 3.5)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="sample prompt")
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--speculative", type=int, default=3, help="MTP draft length (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mimo_jax
    from mimo_jax.core.errors import CheckpointError
    from mimo_jax.data import DataError, load_tokenizer
    from mimo_jax.train import TrainConfig, train

    t0 = time.perf_counter()
    tc = TrainConfig.preset("tiny-cpu").override(
        {"time_limit_minutes": args.minutes, "steps": 1_000_000, "val_every": 100}
    )
    try:
        tc = tc.override(args.overrides)
        result = train(tc, args.workdir)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"mimo-jax demo: error: {e}", file=sys.stderr)
        return 2
    losses = result.losses
    if losses:
        k = max(1, min(10, len(losses) // 5))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(
            f"trained steps {result.start_step}..{result.step} in "
            f"{time.perf_counter() - t0:.0f}s: loss {first:.3f} (first {k}) -> {last:.3f} "
            f"(last {k})"
        )
    print(f"checkpoint: {args.workdir}/checkpoints/{result.step}")
    if result.val_perplexity is not None:
        print(
            f"validation: loss {result.val_loss:.4f}, perplexity {result.val_perplexity:.2f} "
            f"(bytes of held-out stdlib files)"
        )
    # Generate from the saved checkpoint, as a user would.
    model = mimo_jax.load(args.workdir)
    tok = load_tokenizer(tc.data.tokenizer)
    runs = {}
    for k in (0, args.speculative):
        # The first call compiles; time the second.
        for _ in range(2):
            runs[k] = mimo_jax.generate(model, [args.prompt], tokenizer=tok, speculative=k,
                                        max_new_tokens=args.sample_tokens)
    plain, spec = runs[0], runs[args.speculative]
    sampled = mimo_jax.generate(model, [args.prompt], tokenizer=tok, temperature=0.8, top_p=0.95,
                                seed=0, max_new_tokens=args.sample_tokens)
    rule = "-" * 60
    print(f"sample (temperature 0.8, top-p 0.95):\n{rule}\n{args.prompt}{sampled.text[0]}\n{rule}")
    print(f"sample (greedy):\n{rule}\n{args.prompt}{plain.text[0]}\n{rule}")
    print(f"plain decoding: {plain.tokens_per_second:.0f} tokens/s")
    if args.speculative:
        same = spec.tokens == plain.tokens
        print(f"MTP speculative decoding (K={args.speculative}): "
              f"{spec.tokens_per_second:.0f} tokens/s, acceptance length "
              f"{spec.acceptance_length:.2f}, speedup "
              f"{spec.tokens_per_second / plain.tokens_per_second:.2f}x, "
              f"same tokens as plain: {same}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mimo_jax.commands.demo ...` (same arguments as `mimo-jax demo`)."""
    parser = argparse.ArgumentParser(prog="mimo-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
