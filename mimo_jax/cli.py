"""The `mimo-jax` command line. Each feature module registers its own subcommand here."""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand module, attribute): each module exposes `register(subparsers)`, which adds its
# parser and sets `func=callable(args) -> int` on it. Imported lazily so `--help` stays fast.
_COMMANDS = [
    "mimo_jax.commands.info",
    "mimo_jax.commands.plan",
    "mimo_jax.commands.convert",
    "mimo_jax.commands.inspect",
    "mimo_jax.commands.train",
    "mimo_jax.commands.demo",
    "mimo_jax.commands.generate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
