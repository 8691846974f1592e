"""`mimo-jax convert`: released safetensors <-> Orbax model directories, streaming."""

from __future__ import annotations

import argparse
import sys

from mimo_jax.commands.common import dtype_arg, fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints: hf-to-orbax, orbax-to-hf")
    _add_subcommands(p)


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    modes = p.add_subparsers(dest="mode", required=True)
    h = modes.add_parser("hf-to-orbax", help="release/HF directory -> Orbax model directory")
    h.add_argument("src")
    h.add_argument("dst")
    group = h.add_mutually_exclusive_group()
    group.add_argument("--dtype", type=dtype_arg, metavar="DTYPE",
                       help="parameter dtype: bf16 | f32 | f16, any spelling (default: the "
                            "checkpoint's; bf16 for FP8 sources)")
    group.add_argument("--keep-fp8", action="store_true",
                       help="store FP8 payloads and scales as they are; dequantised on load")
    h.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(func=run)
    o = modes.add_parser("orbax-to-hf", help="Orbax model dir / training checkpoint -> release")
    o.add_argument("src")
    o.add_argument("dst")
    o.add_argument("--fp8", action="store_true",
                   help="block-quantise as the release does (E4M3, 128x128 scales)")
    o.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size")
    o.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    o.add_argument("--no-progress", action="store_true")
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mimo_jax.checkpoint import hf_to_orbax, orbax_to_hf
    from mimo_jax.core.errors import CheckpointError

    try:
        if args.mode == "hf-to-orbax":
            out = hf_to_orbax(args.src, args.dst, dtype=args.dtype, keep_fp8=args.keep_fp8,
                              overwrite=args.overwrite, progress=not args.no_progress)
        else:
            out = orbax_to_hf(args.src, args.dst, fp8_out=args.fp8, overwrite=args.overwrite,
                              max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                              progress=not args.no_progress)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        return fail("convert", e, code=1)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mimo_jax.commands.convert ...` (same as `mimo-jax convert ...`)."""
    p = argparse.ArgumentParser(prog="mimo-jax convert", description=__doc__)
    _add_subcommands(p)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
