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


def describe_task(spec: dict) -> str:
    kind = spec.get("kind")
    if kind == "mod_add":
        m = spec.get("modulus", 100)
        top = spec.get("max_operand", m)
        n = spec.get("terms", 2)
        names = "abcdefgh"[:n]
        if n * (top - 1) < m:  # the modulus never wraps: a plain sum
            ex = [(3, 1, 4, 1, 5, 9, 2, 6)[i] % top for i in range(n)]
            return (f'"{"+".join(names)}=" -> {" + ".join(names)}, each in [0, {top}) '
                    f'(e.g. "{"+".join(map(str, ex))}=" -> "{sum(ex)}")')
        return f'"{"+".join(names)}=" -> ({" + ".join(names)}) mod {m}, each in [0, {top})'

    if kind == "reverse":
        a = spec.get("alphabet", "abcdefgh")
        return (f'"r:abc=" -> "cba" over the {len(a)} letters {a}, length '
                f'{spec.get("min_len", 3)}-{spec.get("max_len", 6)}')
    return json.dumps(spec)


def _per_stage(timings: dict, kind: str) -> dict[str, float]:
    """{stage: seconds} from `<stage>_<kind>_s` (built earlier) and
    `<stage>_<kind>_s_this_invocation` (MOPD, resumed) timing keys."""
    out = {}
    for suffix in (f"_{kind}_s", f"_{kind}_s_this_invocation"):
        out.update({k[: -len(suffix)]: v for k, v in timings.items()
                    if k.endswith(suffix) and k != suffix[1:]})
    return out


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
    o = demo["options"]
    teacher = {d: scores[f"teacher {d}"][d] for d in domains}
    before = {d: scores["base (student before MOPD)"][d] for d in domains}
    after = {d: scores["student after MOPD"][d] for d in domains}
    base_s = {d: scores[base_name][d] for d in domains}
    rows = [f"| {d} | {teacher[d]:.3f} | {before[d]:.3f} | {after[d]:.3f} | "
            f"{after[d] / max(teacher[d], 1e-9):.1%} | {base_s[d]:.3f} | "
            f"{base_s[d] / max(teacher[d], 1e-9):.1%} |" for d in domains]
    reached = {d: after[d] >= 0.9 * teacher[d] for d in domains}
    others = [d for d in domains if d != bd]
    base_short = {d: base_s[d] < 0.9 * teacher[d] for d in others}
    teachers_ok = all(teacher[d] >= 0.6 for d in domains)
    ok = all(reached.values()) and all(base_short.values()) and teachers_ok
    m = o["mopd"]
    cpu, wall = _per_stage(t, "cpu"), _per_stage(t, "wall")
    stage_rows = [f"| {k} | {cpu[k]:.0f} | {wall.get(k, float('nan')):.0f} |"
                  for k in ("base", *(f"teacher_{d}" for d in domains), "mopd",
                            f"baseline_sft_{bd}", "scoring") if k in cpu]
    n_base_tok = t.get(f"baseline_sft_{bd}_answer_tokens")
    lines = [
        "# MOPD on CPU: two synthetic domains, two teachers, one student",
        "",
        "Multi-teacher on-policy distillation (`mimo_jax.post_train`, report §4.4 Eqs. 7-9) "
        "with rollout routing replay and IcePop, on a "
        f"{demo['model_config_params'] / 1e6:.2f}M-parameter MiMo (hybrid sliding/global "
        "attention with sinks, sigmoid top-2-of-8 MoE, scanned blocks; byte vocabulary).",
        "",
        "Domains (prompts and answers as text, exact-match reward): "
        + "; ".join(f"`{d}`: {describe_task(o['tasks'][d])}" for d in domains) + ". "
        "Held-out prompts (a fixed hash of the prompt, 20%) are never trained on; the table's "
        f"scores are greedy exact match on {o['eval_prompts']} held-out prompts per domain "
        f"(the curves': {m['eval_prompts']}).",
        "",
        f"Pipeline: base = {o['base_steps']} SFT steps on both domains (batch "
        f"{o['batch_size']}, lr {o['sft_lr']}; the student's start); teacher per domain = base "
        f"+ {o['teacher_steps']} SFT steps on its domain; MOPD = {o['mopd_steps']} steps x "
        f"{m['prompts_per_step']} prompts x {m['samples_per_prompt']} samples (T = "
        f"{m['temperature']}, alpha = {m['alpha']}, IcePop [0.5, 5], Adam lr {m['lr']}"
        + (f" cosine to {m['end_lr']}" if m.get("end_lr") is not None else "") + ", "
        f"routing replay on) = {demo['mopd_response_tokens']} sampled tokens trained on; "
        f"baseline = base + SFT on {demo['baseline_steps']} batches of teacher-`{bd}` samples "
        f"(T = {m['temperature']}) on `{bd}` prompts, "
        + (f"{n_base_tok} answer tokens" if n_base_tok is not None else "about as many tokens")
        + " (the same number of tokens as MOPD, from one teacher).",
        "",
        "| domain | teacher | student before MOPD | student after MOPD | after / teacher | "
        f"SFT baseline ({bd} only) | baseline / teacher |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Target: " + ("**met**" if ok else "**NOT met**") + ". "
        + "; ".join(f"MOPD student on {d}: {after[d] / max(teacher[d], 1e-9):.1%} of the "
                    f"teacher ({'>=' if reached[d] else '<'} 90%)" for d in domains)
        + "; " + "; ".join(f"SFT baseline on {d} (the domain it was not trained on): "
                           f"{base_s[d] / max(teacher[d], 1e-9):.1%} of the teacher "
                           f"({'<' if base_short[d] else '>='} 90%)" for d in others)
        + "; teachers " + ", ".join(f"{d} {teacher[d]:.3f}" for d in domains)
        + (" (both >= 0.6)." if teachers_ok else " (not both >= 0.6)."),
        "",
        "![held-out scores](mopd_heldout.png)",
        "",
        "![training metrics](mopd_training.png)",
        "",
        "## Cost and conditions",
        "",
        f"- command: `{demo.get('command', command)}`",
        f"- the last invocation of the command: {t['cpu_s_this_invocation']:.0f} CPU s (user + "
        f"system of the process, all threads), {t['wall_s_this_invocation']:.0f} s wall (stages "
        "reused from an earlier invocation not included; the table gives each stage's cost "
        "where it was built)",
        f"- load average at the end: {', '.join(f'{x:.2f}' for x in demo['load_average'])} "
        f"({os.cpu_count()} cores, shared with other jobs)",
        "",
        "| stage | CPU s | wall s |",
        "|---|---|---|",
        *stage_rows,
        "",
    ]
    notes = os.path.join(out_dir, "mopd_notes.md")  # hand-written context, kept on rewrites
    if os.path.exists(notes):
        with open(notes) as f:
            lines += ["", f.read().rstrip(), ""]
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
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m experiments.mopd", *(shlex.quote(a) for a in given)])
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
        path = os.path.join(args.workdir, "demo.json")
        with open(path) as f:
            demo = json.load(f)
        demo["command"] = command  # what produced these numbers (a --report-only rerun keeps it)
        with open(path, "w") as f:
            json.dump(demo, f, indent=2)
    print(write_report(args.workdir, command, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
