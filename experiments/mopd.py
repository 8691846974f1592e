"""The MOPD demonstration (issue 20): teachers per domain, MOPD, an SFT baseline, on CPU.

    python -m experiments.mopd [--workdir runs/mopd_demo] [--set key=value ...] [--report-only]

Runs `mimo_jax.post_train.demo.run_demo` (rerunning reuses finished stages and resumes MOPD),
then writes `experiments/results/mopd.md` and its PNG learning curves. No `SWEEP`: this is
not a pre-training sweep, so `python -m experiments list` does not show it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_report(workdir: str, command: str, out_dir: str = RESULTS) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "demo.json")) as f:
        demo = json.load(f)
    recs = _read_jsonl(os.path.join(workdir, "mopd", "metrics.jsonl"))
    train = [r for r in recs if r.get("split") is None]
    evals = [r for r in recs if r.get("split") == "eval"]
    scores = demo["scores"]
    domains = sorted(scores["student after MOPD"])
    bd = demo["baseline_domain"]
    base_name = f"SFT baseline (teacher {bd} only)"

    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6))
    for ax, d in zip(axes, domains, strict=True):
        ax.plot([r["step"] for r in evals], [r[f"score_{d}"] for r in evals], "o-",
                label="student (MOPD)")
        ax.axhline(scores[f"teacher {d}"][d], color="k", ls="--", label=f"teacher {d}")
        ax.axhline(0.9 * scores[f"teacher {d}"][d], color="gray", ls=":", label="90% of teacher")
        ax.axhline(scores[base_name][d], color="tab:red", ls="-.", label=f"SFT baseline ({bd})")
        ax.set_title(f"held-out exact match: {d}")
        ax.set_xlabel("MOPD step")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = os.path.join(out_dir, "mopd_heldout.png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    keys = [("reward", "rollout reward (train prompts)"), ("reverse_kl", "reverse KL to teacher "
            "(nats/token)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    steps = [r["step"] for r in train]
    for ax, (k, title) in zip(axes[:2], keys, strict=True):
        for d in domains:
            ax.plot(steps, [r[f"{k}_{d}"] for r in train], label=d, lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("MOPD step")
        ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(steps, [r["icepop_drop_rate"] for r in train], label="IcePop drop rate", lw=0.8)
    if "replay_mismatch_rate" in train[0]:
        ax.plot(steps, [r["replay_mismatch_rate"] for r in train],
                label="routing mismatch without replay", lw=0.8)
    ax.set_title("IcePop / routing replay")
    ax.set_xlabel("MOPD step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = os.path.join(out_dir, "mopd_training.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)

    t = demo["timings"]
    rows = []
    for d in domains:
        teacher = scores[f"teacher {d}"][d]
        after = scores["student after MOPD"][d]
        rows.append(f"| {d} | {teacher:.3f} | {scores['base (student before MOPD)'][d]:.3f} | "
                    f"{after:.3f} | {after / max(teacher, 1e-9):.1%} | "
                    f"{scores[base_name][d]:.3f} | "
                    f"{scores[base_name][d] / max(teacher, 1e-9):.1%} |")
    o = demo["options"]
    verdict = {d: "reached" if scores["student after MOPD"][d]
               >= 0.9 * scores[f"teacher {d}"][d] else "NOT reached" for d in domains}
    lines = [
        "# MOPD on CPU: two synthetic domains, two teachers, one student",
        "",
        "Multi-teacher on-policy distillation (`mimo_jax.post_train`, report §4.4 Eqs. 7-9) "
        "with rollout routing replay and IcePop, on a "
        f"{demo['model_config_params'] / 1e6:.2f}M-parameter MiMo (hybrid sliding/global "
        "attention with sinks, sigmoid top-2-of-8 MoE, scanned blocks; byte vocabulary).",
        "",
        "Domains (prompts and answers as text, exact-match reward): `add` = \"a+b=\" -> "
        "(a+b) mod 100; `reverse` = \"r:abcd=\" -> \"dcba\" over 8 letters, length 3-6. "
        "Held-out prompts (a fixed hash of the prompt, 20%) are never trained on; scores are "
        f"greedy exact match on {o['eval_prompts']} held-out prompts per domain.",
        "",
        f"Pipeline: base = {o['base_steps']} SFT steps on both domains (the student's start); "
        f"teacher per domain = base + {o['teacher_steps']} SFT steps on its domain; MOPD = "
        f"{o['mopd_steps']} steps x {o['mopd']['prompts_per_step']} prompts x "
        f"{o['mopd']['samples_per_prompt']} samples (T = {o['mopd']['temperature']}, "
        f"alpha = {o['mopd']['alpha']}, IcePop [0.5, 5], lr {o['mopd']['lr']}); baseline = base "
        f"+ SFT on {demo['baseline_steps']} batches of teacher-`{bd}` samples on `{bd}` prompts, "
        f"as many answer tokens as MOPD trained on ({demo['mopd_response_tokens']}).",
        "",
        "| domain | teacher | student before MOPD | student after MOPD | after / teacher | "
        f"SFT baseline ({bd} only) | baseline / teacher |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Target (after MOPD >= 90% of each domain's teacher): "
        + ", ".join(f"{d} {verdict[d]}" for d in domains)
        + ". A teacher near 0 makes its domain's ratio meaningless (see the teacher column).",
        "",
        "![held-out scores](mopd_heldout.png)",
        "",
        "![training metrics](mopd_training.png)",
        "",
        "## Cost and conditions",
        "",
        f"- command: `{command}`",
        "- CPU seconds (user + system, this process) per stage: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(t.items())),
        f"- load average at the end: {', '.join(f'{x:.2f}' for x in demo['load_average'])} "
        "(2 cores shared with other jobs)",
        "",
    ]
    md = os.path.join(out_dir, "mopd.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.mopd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/mopd_demo")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="demo option (seq_len, teacher_steps, mopd_steps, mopd.lr, ...)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    command = "python -m experiments.mopd " + " ".join(shlex.quote(a) for a in
                                                       (argv if argv is not None else sys.argv[1:]))
    if not args.report_only:
        from mimo_jax.core import logs
        from mimo_jax.post_train.demo import run_demo

        overrides: dict = {}
        for item in args.sets:
            k, raw = item.split("=", 1)
            try:
                v = json.loads(raw)
            except json.JSONDecodeError:
                v = raw
            if k.startswith("mopd."):
                overrides.setdefault("mopd", {})[k[5:]] = v
            else:
                overrides[k] = v
        logs.set_verbosity("normal")
        run_demo(args.workdir, overrides, log=print)
    print(write_report(args.workdir, command, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
