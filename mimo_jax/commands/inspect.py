"""`mimo-jax inspect PATH`: what a checkpoint holds (release safetensors or Orbax)."""

from __future__ import annotations

import argparse

from mimo_jax.commands.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a checkpoint: config, tensors, FP8, MTP")
    p.add_argument("path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mimo_jax.checkpoint.inspect import inspect
    from mimo_jax.core.errors import CheckpointError

    try:
        print(inspect(args.path))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        return fail("inspect", e, code=1)
    return 0
