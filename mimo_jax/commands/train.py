"""`mimo-jax train --preset NAME --workdir DIR [--steps N] [--set key=value ...]`.

Running the same command again resumes from the latest checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mimo_jax.commands.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a MiMo (resumes from the latest checkpoint in DIR)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny-cpu", help="tiny-cpu | flash (default tiny-cpu)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/")
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides the preset)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field (data.X, model.X for nested ones); repeatable",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from mimo_jax.core.dtypes import canonical_dtype
    from mimo_jax.core.errors import CheckpointError
    from mimo_jax.data import DataError
    from mimo_jax.train import TrainConfig, train

    try:
        tc = TrainConfig.preset(args.preset).override(args.overrides)
        if args.steps is not None:
            tc = tc.override({"steps": args.steps})
        # Any dtype spelling (bf16, f32, ...) -> the canonical name, before any work starts.
        tc = dataclasses.replace(
            tc, param_dtype=canonical_dtype(tc.param_dtype, what="param_dtype"),
            compute_dtype=canonical_dtype(tc.compute_dtype, what="compute_dtype"))
        if args.print_config:
            print(json.dumps(tc.to_dict(), indent=2))
            return 0
        result = train(tc, args.workdir)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        return fail("train", e)
    val = (
        ""
        if result.val_loss is None
        else (f", val loss {result.val_loss:.4f} (perplexity {result.val_perplexity:.2f})")
    )
    print(
        f"stopped at step {result.step} ({result.stopped_by}){val}; "
        f"checkpoint in {args.workdir}/checkpoints/{result.step}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mimo_jax.commands.train ...` (same arguments as `mimo-jax train`)."""
    parser = argparse.ArgumentParser(prog="mimo-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
