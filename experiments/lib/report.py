"""`report`: run directories -> `experiments/results/<title>.md` tables and PNG plots.

Rows are a sweep's variants (its `group_by` label); each metric is the mean over seeds with
its spread (sample standard deviation, n = seeds; "n=1" when there is one run). The report
also lists every run's exact command, commit, steps, CPU and wall time and the machine load.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from etils import epath

from experiments.lib import registry, rundir
from experiments.lib.spec import ExperimentError, Sweep


def find_runs(root: str, scale: str, prefix: str) -> list[str]:
    base = epath.Path(rundir.join(root, scale, prefix))
    if not base.exists():
        return []
    found = []  # experiment names are at most sweep/variant/seed: no deep (bucket) walks
    for pattern in ("summary.json", "*/summary.json", "*/*/summary.json"):
        found += [str(p.parent) for p in base.glob(pattern)]
    return sorted(set(found))


def load_run(run_dir: str) -> dict[str, Any]:
    summary = rundir.read_json(rundir.join(run_dir, "summary.json"))
    if summary is None:
        raise ExperimentError(f"{run_dir} has no summary.json (has the run finished?)")
    cmd = epath.Path(rundir.join(run_dir, "command.txt"))
    summary["command"] = cmd.read_text().strip() if cmd.exists() else ""
    summary["attempt_log"] = rundir.read_jsonl(rundir.join(run_dir, "attempts.jsonl"))
    summary["train_metrics"] = [r for r in rundir.read_jsonl(rundir.join(run_dir,
                                                                          "metrics.jsonl"))
                                if r.get("split") != "val"]
    summary["run_dir"] = run_dir
    return summary


def aggregate(runs: list[dict[str, Any]], group_by: str, metrics: Sequence[str]
              ) -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """{row: {metric: (mean, std or None, n)}} in the order rows first appear."""
    groups: dict[str, list[dict]] = collections.OrderedDict()
    for r in runs:
        groups.setdefault(str(r["labels"].get(group_by, r["experiment"])), []).append(r)
    out: dict[str, dict[str, tuple[float, float | None, int]]] = collections.OrderedDict()
    for row, members in groups.items():
        cells = {}
        for m in metrics:
            vals = [r["metrics"].get(m) for r in members]
            vals = [float(v) for v in vals if isinstance(v, int | float) and math.isfinite(v)]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else None
                cells[m] = (statistics.fmean(vals), std, len(vals))
        out[row] = cells
    return out


def _cell(c: tuple[float, float | None, int] | None) -> str:
    if c is None:
        return "–"
    mean, std, n = c
    return f"{mean:.4f} ± {std:.4f} (n={n})" if std is not None else f"{mean:.4f} (n=1)"


def markdown_table(rows: dict, metrics: Sequence[str], group_by: str) -> str:
    head = f"| {group_by} | " + " | ".join(metrics) + " |"
    sep = "|" + "---|" * (len(metrics) + 1)
    body = [f"| {row} | " + " | ".join(_cell(cells.get(m)) for m in metrics) + " |"
            for row, cells in rows.items()]
    return "\n".join([head, sep, *body])


def _main_ce(record: dict[str, Any]) -> float:
    """The main head's training CE of a metrics.jsonl record (a number, or [main, mtp...])."""
    ce = record.get("ce", record.get("loss"))
    return float(ce[0] if isinstance(ce, list) else ce)


def _plot_sweep(sweep_name: str, runs: list[dict], rows: dict, metrics: Sequence[str],
                group_by: str, out_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    by_row: dict[str, list[dict]] = collections.OrderedDict()
    for r in runs:
        by_row.setdefault(str(r["labels"].get(group_by, r["experiment"])), []).append(r)
    for row, members in by_row.items():
        curves = []
        for r in members:
            steps = [m["step"] for m in r["train_metrics"]]
            ce = [_main_ce(m) for m in r["train_metrics"]]
            if steps:
                curves.append(dict(zip(steps, ce, strict=True)))
        if not curves:
            continue
        common = sorted(set.intersection(*(set(c) for c in curves)))
        common = [s for s in common if s > 0.2 * common[-1]]  # skip the first fifth: scale
        mean = np.array([np.mean([c[s] for c in curves]) for s in common])
        k = max(1, len(mean) // 20)  # moving average over ~5% of the run
        smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
        ax.plot(common[k - 1:], smooth, label=f"{row} (n={len(curves)})")
    ax.set_xlabel("step")
    ax.set_ylabel("training main-head CE (nats/token)")
    ax.set_title(f"{sweep_name}: training loss after the first fifth (seed mean, smoothed)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = f"{out_prefix}_loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    shown = [m for m in metrics if any(m in cells for cells in rows.values())]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
        names = list(rows)
        for ax, m in zip(axes[0], shown, strict=True):
            means = [rows[n].get(m, (np.nan, None, 0))[0] for n in names]
            errs = [rows[n].get(m, (0, None, 0))[1] or 0.0 for n in names]
            ax.bar(range(len(names)), means, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
            ax.set_title(m, fontsize=9)
            finite = [v for v in means if math.isfinite(v)]
            if finite and m in ("val_loss", "bits_per_byte"):
                lo, hi = min(finite), max(finite)
                pad = max(hi - lo, 1e-3)
                ax.set_ylim(lo - pad, hi + pad)
        fig.suptitle(f"{sweep_name}: mean ± std over seeds", fontsize=10)
        fig.tight_layout()
        path = f"{out_prefix}_metrics.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _runs_section(runs: list[dict]) -> str:
    lines = ["| run | steps | tokens | CPU s | wall s | load avg (start → end) | commit |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        starts = [a for a in r["attempt_log"] if a.get("event") == "start"]
        ends = [a for a in r["attempt_log"] if a.get("event") == "end"]
        load = (f"{starts[0]['load_avg'][0]:.1f} → {ends[-1]['load_avg'][0]:.1f}"
                if starts and ends else "–")
        commit = (r.get("commit") or "?")[:10] + ("+dirty" if r.get("dirty") else "")
        lines.append(f"| {r['experiment']} | {r['step']} | {r['tokens']:,} | {r['cpu_s']:.0f} | "
                     f"{r['wall_s']:.0f} | {load} | {commit} |")
    total_cpu = sum(r["cpu_s"] for r in runs)
    total_wall = sum(r["wall_s"] for r in runs)
    lines.append("")
    lines.append(f"Total: {len(runs)} runs, {total_cpu / 60:.1f} CPU-minutes (process CPU time, "
                 f"all threads), {total_wall / 60:.1f} wall-minutes.")
    return "\n".join(lines)


def write_report(sweep_names: Sequence[str], *, scale: str = "tiny", root: str = "runs",
                 runs: Sequence[str] | None = None, out: str = "experiments/results",
                 title: str | None = None, notes: str | None = None) -> list[str]:
    """Write `<out>/<title>.md` (+ PNGs); returns the paths written."""
    os.makedirs(out, exist_ok=True)
    all_sweeps = registry.sweeps()
    sections: list[tuple[Sweep | None, list[dict]]] = []
    if runs:
        loaded = [load_run(d) for d in runs]
        by_sweep: dict[str, list[dict]] = collections.OrderedDict()
        for r in loaded:
            by_sweep.setdefault(r["experiment"].split("/")[0], []).append(r)
        sections = [(all_sweeps.get(name), rs) for name, rs in by_sweep.items()]
        title = title or "runs"
    else:
        names = list(sweep_names) or [n for n in all_sweeps if n != "smoke"]
        for name in names:
            if name not in all_sweeps:
                raise ExperimentError(f"no sweep named {name!r}; have {sorted(all_sweeps)}")
            order = {e.name: i for i, e in enumerate(all_sweeps[name].experiments)}
            found = sorted((load_run(d) for d in find_runs(root, scale, name)),
                           key=lambda r: order.get(r["experiment"], len(order)))
            if found:
                sections.append((all_sweeps[name], found))
        if not sections:
            raise ExperimentError(f"no finished runs of {names} under {root}/{scale}")
        title = title or ("ablations" if len(names) > 1 else names[0])
    written: list[str] = []
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = [f"# {title}", "",
          f"Generated by `python -m experiments report` on {when} "
          f"from {sum(len(rs) for _, rs in sections)} run directories (scale `{scale}`).", ""]
    for sweep, rs in sections:
        name = sweep.name if sweep else rs[0]["experiment"].split("/")[0]
        group_by = sweep.group_by if sweep else "variant"
        metrics = list(sweep.metrics) if sweep else sorted(
            {k for r in rs for k, v in r["metrics"].items() if isinstance(v, int | float)})
        rows = aggregate(rs, group_by, metrics)
        prefix = os.path.join(out, title if title == name else f"{title}_{name}")
        pngs = _plot_sweep(name, rs, rows, metrics, group_by, prefix)
        written += pngs
        md += [f"## {name}", ""]
        if sweep:
            md += [sweep.description, ""]
        md += [markdown_table(rows, metrics, group_by), ""]
        if sweep and sweep.verdict:
            md += [f"**Direction vs the report:** {sweep.verdict(rows)}", ""]
        if sweep and sweep.claim:
            md += [f"*The report:* {sweep.claim}", ""]
        md += [f"![{os.path.basename(p)[:-4]}]({os.path.basename(p)})" for p in pngs] + [""]
        md += ["Runs:", "", _runs_section(rs), ""]
        md += ["Commands:", "", "```"] + sorted({r["command"] for r in rs}) + ["```", ""]
    if notes:
        md += [open(notes).read().rstrip(), ""]
    # The runs' summaries next to the report: the tables can be checked without run dirs.
    runs_path = os.path.join(out, f"{title}_runs.jsonl")
    with open(runs_path, "w") as f:
        for _, rs in sections:
            for r in rs:
                keep = {k: v for k, v in r.items() if k not in ("train_metrics", "run_dir")}
                f.write(json.dumps(keep, sort_keys=True, default=str) + "\n")
    written.append(runs_path)
    path = os.path.join(out, f"{title}.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return [path, *written]
