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
# # 2. Evaluate a checkpoint
#
# Perplexity and bits per byte on a corpus, multiple-choice and generation tasks through the
# `mimo-jax` lm-evaluation-harness model, and what compilation costs: every scorer is one
# jitted program of fixed shape, so the first call compiles and a second call does not.
#
# With `CHECKPOINT = None` the notebook makes a tiny trained checkpoint (released layout, FP8)
# in a temp folder and evaluates it on the held-out side of its training corpus; give a path
# (a release/HF directory, an Orbax directory or a training work directory) for the real thing.

# %% tags=["parameters"]
CHECKPOINT = None  # None: make the tiny checkpoint; else a release/HF, Orbax or workdir path
TOKENIZER = None  # None: beside the checkpoint; else a tokenizer.json (or its folder) or "byte"
CORPUS = None  # None: the tiny run's held-out split / "stdlib"; or files, dirs, globs, JSONL
MESH = ""  # "" = one device; e.g. "fsdp=-1" or "data=2,fsdp=4" on a TPU VM
DTYPE = None  # None: float32 for TINY (CPU), else the checkpoint's (bfloat16 for the release)
KEEP_FP8 = False  # keep FP8 weights as E4M3 on device (the release: half of bf16's memory)
TINY = True  # small sizes so that the whole notebook runs on a CPU in minutes
SEQ_LEN = None  # rows the corpus is packed into (None: 128 tiny / 4096)
BATCH_SIZE = None  # rows per compiled batch (None: 4 tiny / 8)
MAX_ROWS = None  # score at most this many rows (None: 8 tiny / all)
TASKS = ["mimo_arith_mc", "mimo_copy_words", "mimo_text_ppl"]  # lm-eval tasks or YAML files
LIMIT = None  # documents per task (None: 12 tiny / all)
OUTPUT_DIR = None  # write results.json / results.md here

# %%
# ruff: noqa: E402  (a notebook imports in the cell that first needs it)
import os
import sys
import time

try:
    import notebook_support as nbs
except ImportError:  # the kernel started in another folder: this one sits beside the package
    import experiments

    sys.path.insert(0, os.path.join(os.path.dirname(experiments.__file__), "notebooks"))
    import notebook_support as nbs


nbs.enable_compilation_cache()
SEQ_LEN = SEQ_LEN or (128 if TINY else 4096)
BATCH_SIZE = BATCH_SIZE or (4 if TINY else 8)
MAX_ROWS = MAX_ROWS if MAX_ROWS is not None else (8 if TINY else None)
LIMIT = LIMIT if LIMIT is not None else (12 if TINY else None)
DTYPE = DTYPE or ("float32" if TINY else None)
nbs.environment()

# %% [markdown]
# ## Load the checkpoint

# %%
opened = nbs.open_checkpoint(CHECKPOINT, tokenizer=TOKENIZER, dtype=DTYPE, mesh=MESH,
                             keep_fp8=KEEP_FP8)
model, tok = opened.model, opened.tokenizer
if CORPUS is not None:
    from mimo_jax.eval import Corpus

    corpus = Corpus(source=CORPUS)
elif opened.tiny is not None:
    corpus = opened.tiny.corpus("val")  # documents the tiny model never trained on
else:
    from mimo_jax.eval import Corpus

    corpus = Corpus(source="stdlib", split="val")
print(corpus)

# %% [markdown]
# ## Perplexity and bits per byte, twice
#
# `mimo_jax.eval.perplexity` packs the corpus into `[BATCH_SIZE, SEQ_LEN]` rows and scores them
# with one jitted function. `compilations` counts the traces of that function during the call:
# the first call compiles (1), the second finds the executable and only runs (0).

# %%
from mimo_jax.eval import perplexity

calls = []
for attempt in (1, 2):
    with opened.activate():
        res = perplexity(model, corpus, tokenizer=opened.tokenizer_spec, seq_len=SEQ_LEN,
                         batch_size=BATCH_SIZE, max_rows=MAX_ROWS)
    calls.append(res)
    print(f"call {attempt}: {res.compilations} compilation(s), {res.seconds:.2f} s, "
          f"{res.tokens} tokens, ppl {res.perplexity:.3f}, {res.bits_per_byte:.4f} bits/byte")
assert calls[0].nll == calls[1].nll  # the same program on the same rows
ppl = calls[1]
nbs.show_table([
    {"call": i + 1, "compilations": r.compilations, "seconds": r.seconds, "tokens": r.tokens,
     "tokens/s": r.tokens / r.seconds} for i, r in enumerate(calls)])

# %% [markdown]
# ## lm-evaluation-harness tasks
#
# The `mimo-jax` lm-eval model scores `loglikelihood` requests packed into a few bucket
# lengths (one compiled program per bucket) and generates with the KV-cached `generate`. The
# default tasks ship with mimo-jax and need no dataset hub: `mimo_arith_mc` (multiple choice),
# `mimo_copy_words` (generation until a newline, exact match) and `mimo_text_ppl` (rolling
# perplexity). Any lm-eval task name or YAML file works on a machine that can read its data.

# %%
try:
    import lm_eval  # noqa: F401
except ImportError:
    lm_eval = None
    print("lm-eval is not installed: pip install -e '.[eval]' -c constraints.txt")

task_rows, lm_stats, repeat_compilations, results = [], {}, None, None
if lm_eval is not None:
    from mimo_jax.eval.harness import run_tasks, task_manager
    from mimo_jax.eval.lm_backend import MimoLM

    lm = MimoLM(pretrained=model, tokenizer=tok, max_length=SEQ_LEN * 2,
                max_gen_toks=32 if TINY else 256, mesh=opened.mesh, progress=False)
    manager = task_manager(TASKS)
    t0 = time.perf_counter()
    results = run_tasks(lm, TASKS, limit=LIMIT, bootstrap_iters=0, manager=manager)
    lm_seconds = time.perf_counter() - t0
    lm_stats = results["mimo_jax"]
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            if "," in key and "_stderr" not in key and isinstance(value, int | float):
                task_rows.append({"task": task, "metric": key.split(",")[0], "value": value,
                                  "n": results["n-samples"].get(task, {}).get("effective")})
    nbs.show_table(task_rows)
    # The same multiple-choice task again: every bucket's program is already compiled.
    before = lm.scorer.stats.compilations
    run_tasks(lm, TASKS[:1], limit=LIMIT, bootstrap_iters=0, manager=manager)
    repeat_compilations = lm.scorer.stats.compilations - before
    print(f"lm-eval: {lm_seconds:.1f} s; repeating {TASKS[0]}: {repeat_compilations} new "
          "compilations")

# %% [markdown]
# ## Compile time against run time

# %%
# The first perplexity call compiles and runs; the second only runs the same work, so the
# difference of the two is the compilation.
bars = [("perplexity, call 1", calls[1].seconds, max(calls[0].seconds - calls[1].seconds, 0)),
        ("perplexity, call 2", calls[1].seconds, 0.0)]
if lm_stats:
    sc, gen = lm_stats["scoring"], lm_stats["generation"]
    bars.append(("lm-eval scoring", sc["run_seconds"], sc["compile_seconds"]))
    if gen.get("requests"):
        bars.append(("lm-eval generation", gen["seconds"] - gen["compile_seconds"],
                     gen["compile_seconds"]))
fig, ax = nbs.figure(figsize=(7, 3))
labels = [b[0] for b in bars]
ax.barh(labels, [b[2] for b in bars], color="tab:red", label="compile")
ax.barh(labels, [b[1] for b in bars], left=[b[2] for b in bars], color="tab:blue", label="run")
ax.invert_yaxis()
ax.set_xlabel("seconds")
ax.legend(loc="lower right")
ax.set_title("jitted scorers: a second call does not compile")
nbs.show(fig, "evaluate_compile_vs_run")
nbs.show_table([{"what": b[0], "compile s": b[2], "run s": b[1]} for b in bars])

# %% [markdown]
# ## Results

# %%
table = [{"eval": "perplexity", "metric": "perplexity", "value": ppl.perplexity},
         {"eval": "perplexity", "metric": "bits_per_byte", "value": ppl.bits_per_byte},
         {"eval": "perplexity", "metric": "nll (nats/token)", "value": ppl.nll}]
table += [{"eval": r["task"], "metric": r["metric"], "value": r["value"]} for r in task_rows]
nbs.show_table(table)
if OUTPUT_DIR and results is not None:
    from mimo_jax.eval.harness import write_results

    paths = write_results(results, OUTPUT_DIR, extra={"perplexity": ppl.as_dict()})
    print("wrote", paths["json"], paths["markdown"])

tasks = {}
for r in task_rows:
    tasks.setdefault(r["task"], {})[r["metric"]] = r["value"]
summary = nbs.report("evaluate", perplexity=ppl.perplexity, bits_per_byte=ppl.bits_per_byte,
           tokens=ppl.tokens, compilations=[c.compilations for c in calls],
           seconds=[c.seconds for c in calls], tasks=tasks,
           lm_eval_repeat_compilations=repeat_compilations,
           scoring=lm_stats.get("scoring"), generation=lm_stats.get("generation"),
           cpu_seconds=nbs.cpu_seconds())
