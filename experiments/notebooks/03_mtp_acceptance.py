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
# # 3. MTP acceptance against entropy, and speculative speed-up
#
# MiMo-V2-Flash drafts K tokens with its multi-token-prediction heads and verifies them with
# one forward of the main model. How many drafts survive depends on how predictable the text
# is: the report (Fig. 7) fits the acceptance length y against the next-token entropy x as
# y = 4 (1 - 0.58 x^0.58) for K = 3.
#
# Here, teacher-forced on a corpus (`mimo_jax.eval.mtp_acceptance`, definitions in
# `mimo_jax/eval/mtp.py`): per start position, the acceptance length of a K-draft round and the
# main model's mean next-token entropy (nats) over the verified positions; binned means per K;
# our fit of y = a (1 - b x^c) beside the paper's; then measured decoding speed against K with
# `mimo_jax.generate(..., speculative=K)`.

# %% tags=["parameters"]
CHECKPOINT = None  # None: make the tiny checkpoint; else a release/HF, Orbax or workdir path
TOKENIZER = None  # None: beside the checkpoint; else a tokenizer.json (or its folder) or "byte"
CORPUS = None  # None: the tiny run's held-out split / "stdlib"; or files, dirs, globs, JSONL
MESH = ""  # "" = one device; e.g. "fsdp=-1" on a TPU VM
DTYPE = None  # None: float32 for TINY (CPU), else the checkpoint's
KEEP_FP8 = False  # keep FP8 weights as E4M3 on device (the release: half of bf16's memory)
TINY = True  # small sizes so that the whole notebook runs on a CPU in minutes
SEQ_LEN = None  # packed row length (None: 128 tiny / 4096)
BATCH_SIZE = None  # rows per compiled batch (None: 8 both)
MAX_ROWS = None  # rows scored (None: 24 tiny / 256)
NUM_PROMPTS = None  # prompts decoded together for the speed-up (None: 4 tiny / 8)
PROMPT_TOKENS = 32  # tokens of held-out text per prompt
MAX_NEW_TOKENS = None  # (None: 48 tiny / 256)
OUTPUT_DIR = None  # save the per-position arrays (acceptance.npz) here

# %%
# ruff: noqa: E402  (a notebook imports in the cell that first needs it)
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
SEQ_LEN = SEQ_LEN or (128 if TINY else 4096)
BATCH_SIZE = BATCH_SIZE or 8
MAX_ROWS = MAX_ROWS or (24 if TINY else 256)
NUM_PROMPTS = NUM_PROMPTS or (4 if TINY else 8)
MAX_NEW_TOKENS = MAX_NEW_TOKENS or (48 if TINY else 256)
DTYPE = DTYPE or ("float32" if TINY else None)
nbs.environment()

# %%
from mimo_jax.eval import Corpus

opened = nbs.open_checkpoint(CHECKPOINT, tokenizer=TOKENIZER, dtype=DTYPE, mesh=MESH,
                             keep_fp8=KEEP_FP8)
model = opened.model
if CORPUS is not None:
    corpus = Corpus(source=CORPUS)
elif opened.tiny is not None:
    corpus = opened.tiny.corpus("val")
else:
    corpus = Corpus(source="stdlib", split="val")
K = len(model.mtp)
print(f"{K} MTP heads")

# %% [markdown]
# ## Teacher-forced acceptance

# %%
from mimo_jax.eval import mtp_acceptance

with opened.activate():
    acc = mtp_acceptance(model, corpus, tokenizer=opened.tokenizer_spec, seq_len=SEQ_LEN,
                         batch_size=BATCH_SIZE, max_rows=MAX_ROWS)
print(f"{acc.positions} start positions, {acc.tokens} scored tokens, {acc.compilations} "
      f"compilation(s), {acc.seconds:.1f} s; main top-1 {acc.main_accuracy:.3f}, "
      f"mean entropy {acc.mean_entropy:.3f} nats")
nbs.show_table([
    {"K (heads used)": k + 1, "draft k matches": acc.marginal_rate[k],
     "accepted | previous": acc.conditional_rate[k], "drafts 1..k accepted": acc.acceptance_rate[k],
     "acceptance length": acc.acceptance_length[k], "head k top-1 vs text": acc.head_accuracy[k]}
    for k in range(K)])
if OUTPUT_DIR:
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    acc.save_npz(os.path.join(OUTPUT_DIR, "acceptance.npz"))

# %% [markdown]
# ## Acceptance length against entropy
#
# `accept_length` is the K-draft round's 1 + accepted drafts (1..K+1). With only the first k
# heads, the round accepts min(accepted, k): the same positions give the curves for every
# k <= K. Bins hold equal numbers of positions.

# %%
from mimo_jax.eval import acceptance_curve, fit_acceptance_curve

x = acc.entropy.astype(np.float64)
accepted = acc.accept_length.astype(np.int64) - 1
lengths = {k: 1 + np.minimum(accepted, k) for k in range(1, K + 1)}
n_bins = 12 if TINY else 20
edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)))
which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
centers = np.array([x[which == i].mean() for i in range(len(edges) - 1)])

fit_abc = fit_acceptance_curve(x, lengths[K])  # a, b, c free
fit_bc = fit_acceptance_curve(x, lengths[K], a=K + 1)  # the asymptote fixed at K + 1
print("fit y = a (1 - b x^c): a={:.3f} b={:.3f} c={:.3f}".format(*fit_abc))
print(f"fit with a = {K + 1}: b={fit_bc[1]:.3f} c={fit_bc[2]:.3f}")

fig, axes = nbs.figure(1, 2, figsize=(11, 4))
rng = np.random.default_rng(0)
shown = rng.choice(len(x), size=min(len(x), 3000), replace=False)
jitter = rng.uniform(-0.12, 0.12, size=len(shown))
axes[0].scatter(x[shown], lengths[K][shown] + jitter, s=4, alpha=0.25, color="gray",
                label=f"positions (K={K}, jittered)")
grid = np.linspace(x.min(), x.max(), 200)  # the fits, where there is data
paper_grid = np.linspace(0, 1.557, 200)  # the paper's curve down to y = 1 (no drafts)
for k, color in zip(range(1, K + 1), ["tab:blue", "tab:orange", "tab:green", "tab:purple"],
                    strict=False):
    means = [lengths[k][which == i].mean() for i in range(len(centers))]
    axes[0].plot(centers, means, "o-", color=color, ms=4, label=f"binned mean, K={k}")
axes[0].plot(grid, acceptance_curve(grid, *fit_abc), "k-", lw=2,
             label="fit a(1-bx^c): {:.2f}(1-{:.2f}x^{:.2f})".format(*fit_abc))
axes[0].plot(grid, acceptance_curve(grid, *fit_bc), "k--", lw=1.5,
             label=f"fit, a={K + 1}: b={fit_bc[1]:.2f} c={fit_bc[2]:.2f}")
axes[0].plot(paper_grid, acceptance_curve(paper_grid, 4.0, 0.58, 0.58), "r:", lw=2,
             label="paper: 4(1-0.58x^0.58)")
axes[0].set_xlabel("next-token entropy over the verified positions (nats)")
axes[0].set_ylabel("acceptance length (1 + accepted drafts)")
axes[0].set_ylim(0.5, K + 1.5)
axes[0].legend(fontsize=7)
axes[1].hist(x, bins=40, color="gray")
axes[1].set_xlabel("entropy (nats)")
axes[1].set_ylabel("positions")
axes[1].set_title(f"mean entropy {acc.mean_entropy:.2f} nats")
nbs.show(fig, "mtp_acceptance_vs_entropy")

# %% [markdown]
# ## Measured speed-up against K
#
# Greedy decoding of held-out prompts, plain (K = 0) and drafting K tokens per step. Each K is
# run once to compile and once to measure (`compile_seconds` is 0 the second time). On an
# accelerator, decoding is memory-bound and verifying K+1 tokens costs about one step; on a
# CPU with a tiny model the verify forward is not free, so speed-ups there are small or < 1.

# %%
import mimo_jax

docs, indices = corpus.open()
prompts = []
for i in indices:
    ids = opened.tokenizer.encode(docs[i], True)[:PROMPT_TOKENS]
    if len(ids) == PROMPT_TOKENS:
        prompts.append(ids)
    if len(prompts) == NUM_PROMPTS:
        break
rows = []
plain_tokens = None
for k in range(0, K + 1):
    warm = mimo_jax.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, speculative=k,
                             stop_tokens=[])
    res = mimo_jax.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, speculative=k,
                            stop_tokens=[])
    if k == 0:
        plain_tokens = res.tokens
    same = np.mean([a == b for a, b in zip(res.tokens, plain_tokens, strict=True)])
    rows.append({"K": k, "tokens/s": res.tokens_per_second,
                 "acceptance length": res.acceptance_length or 1.0,
                 "compile s (1st call)": warm.compile_seconds,
                 "compile s (2nd call)": res.compile_seconds,
                 "rows identical to plain greedy": same})
base = rows[0]["tokens/s"]
for r in rows:
    r["speed-up"] = r["tokens/s"] / base
nbs.show_table(rows)

fig, ax = nbs.figure(figsize=(6, 3.5))
ks = [r["K"] for r in rows]
ax.bar(ks, [r["speed-up"] for r in rows], color="tab:blue", label="measured speed-up")
ax.plot(ks, [r["acceptance length"] for r in rows], "o-", color="tab:red",
        label="acceptance length (ideal speed-up)")
ax.axhline(1.0, color="gray", lw=0.8)
ax.set_xticks(ks)
ax.set_xlabel("K (drafted tokens per step)")
ax.legend(fontsize=8)
ax.set_title(f"greedy decoding, {len(prompts)} prompts x {MAX_NEW_TOKENS} tokens")
nbs.show(fig, "mtp_speedup_vs_k")

# %%
summary = nbs.report(
    "mtp_acceptance", positions=acc.positions, mean_entropy=acc.mean_entropy,
    acceptance_length_per_k=acc.acceptance_length,
    mean_acceptance_length=float(lengths[K].mean()), fit_abc=list(fit_abc),
    fit_bc_with_a=list(fit_bc), k=ks, speedup=[r["speed-up"] for r in rows],
    tokens_per_second=[r["tokens/s"] for r in rows],
    identical_to_plain=[r["rows identical to plain greedy"] for r in rows],
    cpu_seconds=nbs.cpu_seconds())
