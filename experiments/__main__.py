"""python -m experiments list | show NAME | run NAME | launch NAME | report

  list                               every sweep, its experiments and scales
  show NAME [--scale S] [--set k=v]  the resolved TrainConfig, evals and memory plan
  run NAME [--scale S] [--set k=v]   train + evaluate into ROOT/SCALE/NAME (re-running resumes);
                                     NAME is a sweep (all its experiments) or one experiment
  launch NAME --scale S --tpu VM --zone Z [--project P] [--dry-run]
                                     the same `run` on every worker of a TPU VM slice
  report [SWEEP ...] [--runs DIR ...] tables (experiments/results/*.md) and PNG plots
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "run":
    # Before jax loads: huge-page malloc for XLA:CPU's per-step buffers (as `mimo-jax` does).
    from mimo_jax.core.host_memory import ensure_huge_page_malloc

    ensure_huge_page_malloc()

# Multi-host: jax.distributed.initialize() must run before anything touches devices.
if len(sys.argv) > 1 and sys.argv[1] == "run":
    from mimo_jax.parallel import maybe_initialize

    if not maybe_initialize() and "--distributed" in sys.argv:
        import jax  # no multi-host hint in the environment: let jax detect the slice itself

        jax.distributed.initialize()

from experiments.lib import registry  # noqa: E402
from experiments.lib.runner import DEFAULT_ROOT  # noqa: E402
from experiments.lib.spec import ExperimentError  # noqa: E402


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a sweep or one experiment (see `list`)")
    p.add_argument("--scale", default=None, help="tiny (default: the first declared) | v5p-8 ...")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field after the experiment's (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="declared sweeps, experiments and scales")
    p = sub.add_parser("show", help="resolved config, evals and memory plan")
    _add_common(p)
    p = sub.add_parser("run", help="train and evaluate (re-running resumes)")
    _add_common(p)
    p.add_argument("--root", default=DEFAULT_ROOT, help="run directories: a path or gs://...")
    p.add_argument("--local-dir", default=None,
                   help="train in this local directory and mirror to --root (automatic for gs://)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--distributed", action="store_true",
                   help="one process of a multi-host slice: jax.distributed.initialize() "
                        "(set by `launch`)")
    p = sub.add_parser("launch", help="run on every worker of a TPU VM slice via gcloud")
    _add_common(p)
    p.add_argument("--tpu", required=True, help="the TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--root", required=True, help="run directories, normally gs://BUCKET/runs")
    p.add_argument("--commit", default=None, help="the commit to install (default: HEAD)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="launch although the tree has uncommitted changes (they are NOT sent)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p = sub.add_parser("report", help="markdown tables and PNG plots from run directories")
    p.add_argument("sweeps", nargs="*", help="sweeps to report (default: every ablation found)")
    p.add_argument("--scale", default="tiny")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--runs", nargs="*", default=None, help="explicit run directories instead")
    p.add_argument("--out", default=os.path.join("experiments", "results"))
    p.add_argument("--title", default=None, help="output name (default: the sweeps' names)")
    p.add_argument("--notes", default=None, help="a markdown file appended to the report")
    return parser


def cmd_list(args) -> int:
    for sweep in registry.sweeps().values():
        print(f"{sweep.name}: {sweep.description}")
        print(f"  scales: {', '.join(sweep.scale_names)}")
        for e in sweep.experiments:
            print(f"  {e.name:<32} {e.description}")
    return 0


def cmd_show(args) -> int:
    from experiments.lib.spec import check_memory
    from mimo_jax.parallel.plan import format_plan

    sweep, exps = registry.resolve(args.name)
    for e in exps:
        scale = e.scale(args.scale)
        tc = e.train_config(scale, args.sets)
        cfg = tc.model_config()
        print(f"# {e.name} at {scale.name} ({scale.chips} x {scale.accelerator}, "
              f"{scale.hosts} host(s), mesh {tc.mesh or 'one device'})")
        print(f"{e.description}")
        print(f"overrides: {json.dumps(e.overrides(scale), default=repr)}")
        print(f"layers: {' '.join('G' if t == 'full' else 'S' for t in cfg.layer_types)}; "
              f"window {cfg.sliding_attention.window}, sink {cfg.sliding_attention.has_sink}; "
              f"MTP heads {cfg.num_mtp_layers}")
        print("evals: " + ", ".join(f"{s.kind} {e.eval_options(s, scale)}" for s in e.evals))
        print("train_config: " + json.dumps(tc.to_dict(), indent=1, default=str))
        try:
            print(format_plan(check_memory(tc, scale)))
        except ExperimentError as err:
            print(f"memory check FAILS: {err}")
    return 0


def cmd_run(args) -> int:
    from experiments.lib.runner import run_experiment

    _, exps = registry.resolve(args.name)
    for e in exps:
        run_experiment(e, args.scale, sets=args.sets, root=args.root, argv=sys.argv,
                       local_dir=args.local_dir, evaluate=not args.no_eval)
    return 0


def cmd_launch(args) -> int:
    from experiments.lib.launch import launch

    sweep, exps = registry.resolve(args.name)
    exps[0].scale(args.scale)  # the scale must exist
    return launch(args.name, args.scale, tpu=args.tpu, zone=args.zone, project=args.project,
                  root=args.root, sets=args.sets, commit=args.commit,
                  allow_dirty=args.allow_dirty, dry_run=args.dry_run)


def cmd_report(args) -> int:
    from experiments.lib.report import write_report

    paths = write_report(args.sweeps, scale=args.scale, root=args.root, runs=args.runs,
                         out=args.out, title=args.title, notes=args.notes)
    for p in paths:
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"list": cmd_list, "show": cmd_show, "run": cmd_run, "launch": cmd_launch,
               "report": cmd_report}[args.command]
    try:
        return handler(args)
    except ExperimentError as e:
        print(f"experiments {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
