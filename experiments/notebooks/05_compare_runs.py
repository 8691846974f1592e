# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Compare training runs
#
# Loss curves and final metrics of several run directories: those `python -m experiments run`
# writes (`metrics.jsonl`, `summary.json` with the evaluations, `config.json` with the
# experiment's labels) or any `mimo-jax train` work directory (`metrics.jsonl` only).
# Runs that share a `variant` label (seeds of one experiment) are also aggregated as
# mean ± standard deviation.
#
# With no run directory under `RUNS_ROOT` the notebook trains two tiny runs itself for a
# handful of steps: the tiny model with and without attention sinks.

# %% tags=["parameters"]
CHECKPOINT = None  # unused here (the runs hold their own checkpoints); kept for uniformity
RUNS = None  # run directories to compare; None: every run found under RUNS_ROOT
RUNS_ROOT = None  # None: $MIMO_JAX_RUNS, else runs/ (python -m experiments' default)
MESH = ""  # the mesh of the runs trained here ("" = one device)
TINY = True  # when no run is found: train two tiny runs of STEPS steps
STEPS = 12
SMOOTH = 0.8  # exponential smoothing of the training loss curves (0 = none)
OUTPUT_DIR = None  # write runs.md (the tables) here

# %%
# ruff: noqa: E402  (a notebook imports in the cell that first needs it)
import json
import os
import sys

try:
    import notebook_support as nbs
except ImportError:  # the kernel started in another folder: this one sits beside the package
    import experiments

    sys.path.insert(0, os.path.join(os.path.dirname(experiments.__file__), "notebooks"))
    import notebook_support as nbs

import numpy as np

nbs.enable_compilation_cache()
RUNS_ROOT = RUNS_ROOT or os.environ.get("MIMO_JAX_RUNS") or "runs"
nbs.environment()

# %%
def find_runs(root: str, depth: int = 4) -> list[str]:
    """Directories holding a metrics.jsonl under `root` (at most `depth` levels down)."""
    found, root = [], os.path.abspath(root)
    for d, subdirs, files in os.walk(root):
        if "metrics.jsonl" in files:
            found.append(d)
        if "metrics.jsonl" in files or d[len(root):].count(os.sep) >= depth:
            subdirs[:] = []  # a run's own folders (checkpoints, tensorboard) hold no runs
    return sorted(found)


runs = list(RUNS) if RUNS else (find_runs(RUNS_ROOT) if os.path.isdir(RUNS_ROOT) else [])
print(f"{len(runs)} run directories under {os.path.abspath(RUNS_ROOT)}")

# %% [markdown]
# ## Two tiny runs, when there are none
#
# The tiny model of the other notebooks (same tokenizer and shapes), trained for `STEPS`
# steps on the standard library's sources, once as is and once without attention sinks.
# Each run directory is laid out as `python -m experiments run` lays them out.

# %%
if not runs and TINY:
    from mimo_jax.train import TrainConfig, train

    tiny = nbs.tiny_checkpoint()
    recipe = tiny.info["recipe"]
    base = TrainConfig.preset("tiny-cpu").override({
        "data.tokenizer": tiny.data["tokenizer"], "model.vocab_size": recipe["vocab_size"],
        "model.full_attention": recipe["full_attention"],
        "model.sliding_attention": recipe["sliding_attention"],
        "steps": STEPS, "batch_size": recipe["batch_size"], "seq_len": recipe["seq_len"],
        "lr": recipe["lr"], "warmup_steps": min(recipe["warmup_steps"], STEPS // 2),
        "val_every": max(STEPS // 3, 1), "save_every": STEPS, "mesh": MESH,
        "console_every": STEPS, "progress_bar": False, "tensorboard": False,
        "async_checkpointing": False})
    variants = {"sinks": {}, "no-sinks": {"model.sliding_attention": {
        **recipe["sliding_attention"], "has_sink": False}}}
    for name, change in variants.items():
        run_dir = os.path.join(RUNS_ROOT, "tiny", "notebook", name)
        tc = base.override(change)
        cpu0 = nbs.cpu_seconds()
        result = train(tc, run_dir)
        labels = {"variant": name, "seed": tc.seed}
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"experiment": f"notebook/{name}", "labels": labels,
                       "train_config": tc.to_dict()}, f, indent=2, default=str)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"experiment": f"notebook/{name}", "labels": labels, "step": result.step,
                       "steps": tc.steps, "tokens": result.step * tc.batch_size * tc.seq_len,
                       "cpu_s": nbs.cpu_seconds() - cpu0,
                       "metrics": {"perplexity": result.val_perplexity}}, f, indent=2)
        runs.append(run_dir)
if not runs:
    raise FileNotFoundError(f"no run directories (metrics.jsonl) under {RUNS_ROOT}; pass RUNS "
                            "or RUNS_ROOT, or TINY=True to train two tiny runs here")

# %% [markdown]
# ## The runs

# %%
def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    summary = read_json(os.path.join(run_dir, "summary.json")) or {}
    config = read_json(os.path.join(run_dir, "config.json")) or {}
    name = summary.get("experiment") or config.get("experiment") or os.path.relpath(
        run_dir, RUNS_ROOT)
    train_rows = [r for r in rows if r.get("split") != "val" and "loss" in r]
    # A resumed run may log a step twice (a killed attempt past its last checkpoint): keep
    # the last record of each step.
    by_step = {r["step"]: r for r in train_rows}
    train_rows = [by_step[s] for s in sorted(by_step)]
    val_rows = sorted({r["step"]: r for r in rows if r.get("split") == "val"}.values(),
                      key=lambda r: r["step"])
    tail = train_rows[-max(len(train_rows) // 10, 1):]
    return {"name": name, "dir": run_dir,
            "labels": summary.get("labels") or config.get("labels") or {},
            "train": train_rows, "val": val_rows,
            "steps": train_rows[-1]["step"] if train_rows else 0,
            "final_train_loss": float(np.mean([r["loss"] for r in tail])) if tail else None,
            "final_val_loss": val_rows[-1]["loss"] if val_rows else None,
            "metrics": summary.get("metrics") or {},
            "cpu_s": summary.get("cpu_s"), "commit": (summary.get("commit") or "")[:10]}


loaded = [load_run(r) for r in runs]
for r in loaded:
    print(f"{r['name']}: {r['steps']} steps, {len(r['val'])} validation points, "
          f"labels {r['labels']}")

# %%
def smooth(values, alpha: float):
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


fig, axes = nbs.figure(1, 2, figsize=(12, 4))
colors = {}
for r in loaded:
    color = colors.setdefault(r["labels"].get("variant", r["name"]), f"C{len(colors) % 10}")
    steps = [x["step"] for x in r["train"]]
    axes[0].plot(steps, smooth([x["loss"] for x in r["train"]], SMOOTH), color=color,
                 alpha=0.85, label=r["name"])
    if "ce" in (r["train"][0] if r["train"] else {}):
        axes[0].plot(steps, smooth([x["ce"] for x in r["train"]], SMOOTH), color=color,
                     ls=":", alpha=0.6)
    if r["val"]:
        axes[1].plot([x["step"] for x in r["val"]], [x["loss"] for x in r["val"]], "o-",
                     color=color, label=r["name"])
axes[0].set_xlabel("step")
axes[0].set_ylabel(f"training loss (EMA {SMOOTH}); dotted: next-token CE")
axes[0].legend(fontsize=7)
axes[1].set_xlabel("step")
axes[1].set_ylabel("validation loss")
axes[1].legend(fontsize=7)
nbs.show(fig, "compare_runs_loss")

# %% [markdown]
# ## Final metrics

# %%
metric_names = sorted({k for r in loaded for k, v in r["metrics"].items()
                       if isinstance(v, int | float) and not isinstance(v, bool)})
table = [{"run": r["name"], "steps": r["steps"], "final train loss": r["final_train_loss"],
          "val loss (training's batches)": r["final_val_loss"],
          **{m: r["metrics"].get(m) for m in metric_names}, "CPU s": r["cpu_s"],
          "commit": r["commit"]} for r in loaded]
columns = [c for c in table[0] if any(row[c] not in (None, "") for row in table)]
nbs.show_table(table, columns)

groups: dict[str, list[dict]] = {}
for r in loaded:
    groups.setdefault(str(r["labels"].get("variant", r["name"])), []).append(r)
aggregate = []
for variant, members in groups.items():
    row = {"variant": variant, "runs": len(members)}
    for m in ["final_val_loss", *metric_names]:
        vals = [x[m] if m == "final_val_loss" else x["metrics"].get(m) for x in members]
        vals = [float(v) for v in vals if isinstance(v, int | float) and np.isfinite(v)]
        if vals:
            spread = f" ± {np.std(vals, ddof=1):.3g}" if len(vals) > 1 else ""
            row[m.replace("final_", "")] = f"{np.mean(vals):.4g}{spread}"
    aggregate.append(row)
if any(len(m) > 1 for m in groups.values()):
    nbs.show_table(aggregate)

shown = [m for m in dict.fromkeys(["val_loss", "perplexity", "bits_per_byte", *metric_names])
         if m in metric_names][:4] or ["final_val_loss"]
fig, axes = nbs.figure(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
for ax, m in zip(axes[0], shown, strict=True):
    names = list(groups)
    means, errs = [], []
    for variant in names:
        vals = [x[m] if m == "final_val_loss" else x["metrics"].get(m) for x in groups[variant]]
        vals = [float(v) for v in vals if isinstance(v, int | float) and np.isfinite(v)]
        means.append(np.mean(vals) if vals else np.nan)
        errs.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    ax.bar(names, means, yerr=errs, color=[colors.get(n, "gray") for n in names], capsize=3)
    ax.set_title(m, fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
nbs.show(fig, "compare_runs_metrics")
if OUTPUT_DIR:
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(OUTPUT_DIR, "runs.md"), "w") as f:
        f.write(nbs.markdown_table(table, columns) + "\n\n" + nbs.markdown_table(aggregate)
                + "\n")

# %%
summary = nbs.report(
    "compare_runs", runs=[{"name": r["name"], "steps": r["steps"],
                           "final_train_loss": r["final_train_loss"],
                           "final_val_loss": r["final_val_loss"]} for r in loaded],
    metrics=metric_names, cpu_seconds=nbs.cpu_seconds())
