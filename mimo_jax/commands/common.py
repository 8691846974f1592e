"""What several subcommands share: argument types and the one way to report a user error."""

from __future__ import annotations

import argparse
import sys

from mimo_jax.core.dtypes import canonical_dtype


def dtype_arg(text: str) -> str:
    """argparse `type=` for dtype flags: any spelling ("bf16", "bfloat16", "f32", ...) -> the
    canonical name; anything else is a usage error (exit 2) naming the accepted ones."""
    try:
        return canonical_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fail(command: str, error: BaseException, code: int = 2) -> int:
    """Print `mimo-jax COMMAND: error: MESSAGE` on stderr (argparse's format) -> exit code."""
    print(f"mimo-jax {command}: error: {error}", file=sys.stderr)
    return code
