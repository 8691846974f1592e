"""`mimo-jax mopd --config FILE --workdir DIR [--steps N] [--set key=value ...]`, or
`mimo-jax mopd --demo --workdir DIR`.

Multi-teacher on-policy distillation (MiMo-V2-Flash report §4.4): the student samples, each
prompt's domain teacher scores every token, the student learns from the reverse-KL token
advantage plus the group-normalised outcome reward, with routing replay and IcePop. The
config (JSON or YAML) holds the fields of `mimo_jax.post_train.MOPDConfig`, e.g.

    student: runs/sft                  # a training / post-training workdir
    teachers: {math: runs/math_teacher, reverse: runs/rev_teacher}
    tasks: {math: {kind: mod_add}, reverse: {kind: reverse}}   # or {kind: jsonl, path: ...}
    steps: 200
    lr: 1.0e-5

Rerunning the same command resumes from the latest checkpoint in DIR. `--demo` runs the CPU
demonstration (teachers trained per synthetic domain, MOPD, an SFT baseline; minutes).
"""

from __future__ import annotations

import argparse
import json
import sys

from mimo_jax.commands.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mopd",
        help="multi-teacher on-policy distillation (resumes from DIR)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a .json / .yaml MOPD config")
    src.add_argument("--demo", action="store_true",
                     help="the CPU demonstration on two synthetic domains")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/")
    p.add_argument("--steps", type=int, help="total MOPD steps (overrides the config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (JSON value); repeatable")
    p.add_argument("--print-config", action="store_true", help="print the resolved config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mimo_jax.core.errors import CheckpointError

    try:
        if args.demo:
            from mimo_jax.post_train.demo import run_demo

            overrides: dict = {}
            for item in args.overrides:
                k, _, raw = item.partition("=")
                try:
                    v = json.loads(raw)
                except json.JSONDecodeError:
                    v = raw
                if k.startswith("mopd."):
                    overrides.setdefault("mopd", {})[k[5:]] = v
                else:
                    overrides[k] = v
            if args.steps is not None:
                overrides["mopd_steps"] = args.steps
            out = run_demo(args.workdir, overrides)
            for name, s in out["scores"].items():
                print(f"{name}: " + ", ".join(f"{d} {v:.3f}" for d, v in s.items()))
            return 0
        from mimo_jax.post_train import MOPDConfig, mopd

        cfg = MOPDConfig.load(args.config).override(args.overrides)
        if args.steps is not None:
            cfg = cfg.override([f"steps={args.steps}"])
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        result = mopd(cfg, args.workdir)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        return fail("mopd", e)
    last = result.history[-1] if result.history else {}
    print(f"stopped at step {result.step}; checkpoint in {args.workdir}/checkpoints/"
          f"{result.step}" + (f"; last reward {last['reward']:.3f}" if last else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mimo_jax.commands.mopd ...` (same arguments as `mimo-jax mopd`)."""
    parser = argparse.ArgumentParser(prog="mimo-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mopd", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
