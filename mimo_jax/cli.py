"""The `mimo-jax` command line. Each feature module registers its own subcommand here.

Global flags go before the subcommand: `mimo-jax --quiet train ...`, `mimo-jax -v convert ...`.
"""

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
    "mimo_jax.commands.eval",
    "mimo_jax.commands.mopd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimo-jax", description=__doc__)
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="print only errors and final results (no progress, no step lines)")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also print the INFO logs of jax, Orbax and Grain")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mimo_jax.core import logs

    args = build_parser().parse_args(argv)
    logs.set_verbosity("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    return int(args.func(args) or 0)


# Subcommands that spend their time in training steps: they run with huge-page malloc (XLA:CPU's
# per-step temporaries fault in ~200x fewer pages; mimo_jax.core.host_memory). Not the others:
# the forward benchmark's jitted forward ran 0.96x as fast with it.
TRAINING_COMMANDS = ("train", "demo", "mopd")


def subcommand(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word after the global flags), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def console_main() -> None:
    """The `mimo-jax` executable: `main`, for the training subcommands in a process restarted
    with huge-page malloc."""
    if subcommand(sys.argv[1:]) in TRAINING_COMMANDS:
        from mimo_jax.core.host_memory import ensure_huge_page_malloc

        ensure_huge_page_malloc()
    sys.exit(main())


if __name__ == "__main__":
    console_main()
