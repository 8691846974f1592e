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
# # 4. Attention with sinks
#
# MiMo-V2-Flash's sliding-window layers have a learned per-head *attention sink*: one extra
# logit s_h in every softmax denominator, so a query can put probability mass "nowhere"
# instead of on the few keys its window offers:
#
# p_ij = exp(q_i.k_j / sqrt(d)) / (exp(s_h) + sum_j' exp(q_i.k_j' / sqrt(d))),
# sink mass_i = exp(s_h) / (same denominator) = 1 - sum_j p_ij.
#
# This notebook recomputes every layer's attention probabilities from the model's own
# queries, keys and sinks (`Attention.project_qkv`, `Attention.sinks`), checks them by
# rebuilding each layer's attention output, and shows: the sink's mass per layer and head, the
# pattern of a sliding-window layer against a global one on real text, and what removing the
# sinks does to the logits. Nothing in `mimo_jax.model` is changed: the ablations are copies of
# the parameter tree with the sink logits set to -1e30.

# %% tags=["parameters"]
CHECKPOINT = None  # None: make the tiny checkpoint; else a release/HF, Orbax or workdir path
TOKENIZER = None  # None: beside the checkpoint; else a tokenizer.json (or its folder) or "byte"
TEXT = None  # None: a held-out document of the tiny run's corpus / the stdlib
MESH = ""  # "" = one device; e.g. "fsdp=-1" on a TPU VM
DTYPE = None  # None: float32 for TINY (CPU), else the checkpoint's
KEEP_FP8 = False  # keep FP8 weights as E4M3 on device (the release: half of bf16's memory)
TINY = True  # small sizes so that the whole notebook runs on a CPU in minutes
SEQ_LEN = None  # tokens of text analysed (None: 192 tiny / 512)
SHOW_TOKENS = None  # the attention maps show the first N queries (None: SEQ_LEN)
OUTPUT_DIR = None  # save sink_mass.npy (layers x heads) here

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

nbs.enable_compilation_cache()
SEQ_LEN = SEQ_LEN or (192 if TINY else 512)
SHOW_TOKENS = SHOW_TOKENS or SEQ_LEN
DTYPE = DTYPE or ("float32" if TINY else None)
nbs.environment()

# %%
opened = nbs.open_checkpoint(CHECKPOINT, tokenizer=TOKENIZER, dtype=DTYPE, mesh=MESH,
                             keep_fp8=KEEP_FP8)
model, tok = opened.model, opened.tokenizer
cfg = model.cfg
if TEXT is None:
    from mimo_jax.eval import Corpus

    corpus = opened.tiny.corpus("val") if opened.tiny else Corpus(source="stdlib", split="val")
    docs, indices = corpus.open()
    TEXT = next(docs[i] for i in indices if len(tok.encode(docs[i], True)) >= SEQ_LEN)
ids = tok.encode(TEXT, True)[:SEQ_LEN]
if len(ids) < SEQ_LEN:
    raise ValueError(f"TEXT has {len(ids)} tokens; SEQ_LEN={SEQ_LEN} wants at least that many")
ids_bt = jnp.asarray([ids], jnp.int32)
sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding"]
global_ = [i for i, t in enumerate(cfg.layer_types) if t == "full"]
window = cfg.sliding_attention.window
print(f"{len(ids)} tokens; layers: global {global_}, sliding {sliding} (window {window} keys "
      f"incl. the query); sinks on sliding layers: {cfg.sliding_attention.has_sink}, on "
      f"global layers: {cfg.full_attention.has_sink}")
print(repr(tok.decode(ids[:80])) + " ...")

# %% [markdown]
# ## Attention probabilities, layer by layer
#
# The main layers are walked in order (the scanned blocks are sliced one repeat at a time
# inside the jitted function). Per layer the function returns the sink's mass per head and
# query, the head-mean attention map, and the largest difference between the attention output
# rebuilt from these probabilities and the layer's own attention (its kernel).

# %%
from mimo_jax.model.mimo import default_positions, scan_plan

NEG = -1e30  # a sink logit that takes no mass (exp underflows to 0)


def main_layers(model):
    """The decoder layers in order; scanned repeats are sliced out of the stacked block."""
    layers = list(model.prefix_layers)
    if model.blocks is not None:
        graphdef, state = nnx.split(model.blocks)
        for b in range(scan_plan(model.cfg).num_blocks):
            block = nnx.merge(graphdef, jax.tree.map(lambda x, b=b: x[b], state))
            layers.extend(block.layers)
    return layers


def attention_probs(attn, x_btd, pos_bt):
    """(p [B, H, T, S], sink mass [B, H, T], values [B, S, H, Dv]) from the layer's q/k/sinks,
    with the layer's mask: causal, and within `window` keys on sliding layers."""
    q_btnh, k_btkh, v_btkh = attn.project_qkv(x_btd, pos_bt)
    b, t, n, d = q_btnh.shape
    g = n // k_btkh.shape[2]
    k_btnh = jnp.repeat(k_btkh, g, axis=2)  # query head h reads KV head h // g
    scores = jnp.einsum("btnd,bsnd->bnts", q_btnh, k_btnh,
                        preferred_element_type=jnp.float32) * d**-0.5
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = j <= i
    if attn.spec.window is not None:
        mask &= j > i - attn.spec.window
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = scores.max(-1)
    sink = jnp.full(row_max.shape, -jnp.inf)
    if attn.sinks is not None:
        sink = jnp.broadcast_to(attn.sinks[...].astype(jnp.float32)[None, :, None], row_max.shape)
        row_max = jnp.maximum(row_max, sink)
    e = jnp.exp(scores - row_max[..., None])
    sink_e = jnp.exp(sink - row_max)  # 0 without a sink
    denom = e.sum(-1) + sink_e
    return e / denom[..., None], sink_e / denom, jnp.repeat(v_btkh, g, axis=2)


@nnx.jit
def analyse(model, ids_bt):
    pos_bt = default_positions(ids_bt.shape, None)
    h = model.embed_tokens(ids_bt)
    out = {"sink_mass": [], "maps": [], "errors": [], "sink_logits": []}
    for layer in main_layers(model):
        attn = layer.attn
        x = layer.input_norm(h)
        p, sink_bht, v = attention_probs(attn, x, pos_bt)
        rebuilt = attn.output(jnp.einsum("bnts,bsnd->btnd", p, v).astype(x.dtype))
        out["errors"].append(jnp.max(jnp.abs(rebuilt - attn(x, pos_bt, None))))
        out["sink_mass"].append(sink_bht[0])  # [H, T]
        out["maps"].append(p[0].mean(0))  # [T, S], mean over heads
        n_heads = p.shape[1]
        out["sink_logits"].append(jnp.full((n_heads,), jnp.nan) if attn.sinks is None
                                  else attn.sinks[...].astype(jnp.float32))
        h, _ = layer(h, pos_bt, None)
    return {k: jnp.stack(v) for k, v in out.items()}


with opened.activate():
    res = jax.device_get(analyse(model, ids_bt))
sink_lht, maps_lts, errors = res["sink_mass"], res["maps"], res["errors"]
reconstruction_err = float(errors.max())
print(f"attention output rebuilt from these probabilities: max |difference| "
      f"{reconstruction_err:.2e} (per layer {np.array2string(errors, precision=1)})")

# %% [markdown]
# ## How much probability the sink absorbs
#
# Mean over queries of the sink's mass, per layer and head (global layers have no sink: 0).
# The last queries see a full window; the first ones see only a few keys, which is where a
# sink matters most, so the right panel splits the mass by query position.

# %%
L, H, T = sink_lht.shape
mass_lh = sink_lht.mean(-1)
fig, axes = nbs.figure(1, 2, figsize=(11, 3.8))
im = axes[0].imshow(mass_lh, aspect="auto", cmap="viridis", vmin=0, vmax=max(mass_lh.max(), 1e-6))
axes[0].set_yticks(range(L), [f"{i} {'G' if cfg.layer_types[i] == 'full' else 'S'}"
                              for i in range(L)])
axes[0].set_xticks(range(H))
axes[0].set_xlabel("head")
axes[0].set_ylabel("layer (G global, S sliding)")
axes[0].set_title("mean sink mass per layer and head")
fig.colorbar(im, ax=axes[0])
for i in sliding:
    axes[1].plot(np.arange(T), sink_lht[i].mean(0), label=f"layer {i}")
axes[1].axvline(window - 1, color="gray", ls="--", lw=0.8, label="window filled")
axes[1].set_xlabel("query position")
axes[1].set_ylabel("sink mass (mean over heads)")
axes[1].set_title("sliding layers: sink mass by position")
axes[1].legend(fontsize=7)
nbs.show(fig, "sinks_mass_per_layer_head")
nbs.show_table([{"layer": i, "type": cfg.layer_types[i], "mean sink mass": float(mass_lh[i].mean()),
                 "max over heads": float(mass_lh[i].max()),
                 "sink logits (min..max)": "-" if np.isnan(res["sink_logits"][i]).all() else
                 f"{np.nanmin(res['sink_logits'][i]):.2f}..{np.nanmax(res['sink_logits'][i]):.2f}"}
                for i in range(L)])
if OUTPUT_DIR:
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    np.save(os.path.join(OUTPUT_DIR, "sink_mass.npy"), mass_lh)

# %% [markdown]
# ## A sliding-window layer against a global layer
#
# Head-mean attention of the first `SHOW_TOKENS` queries (log colour scale). The sliding
# layer's band is `window` keys wide; the global layer can read the whole prefix. The share
# of attention that goes further back than the window says how much each layer uses it.

# %%
layer_s, layer_g = sliding[0], global_[-1]
n = min(SHOW_TOKENS, T)
dist = np.arange(T)[:, None] - np.arange(T)[None, :]


def beyond_window(p_ts):
    return float((p_ts * (dist >= window)).sum(-1).mean())


fig, axes = nbs.figure(1, 3, figsize=(13, 4))
for ax, li in zip(axes[:2], (layer_s, layer_g), strict=True):
    shown = np.log10(np.maximum(maps_lts[li][:n, :n], 1e-5))
    ax.imshow(shown, cmap="magma", vmin=-5, vmax=0)
    ax.set_title(f"layer {li} ({cfg.layer_types[li]}): log10 p, head mean", fontsize=9)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
mean_dist = {li: (maps_lts[li] * np.maximum(dist, 0)).sum(-1) for li in range(L)}
for li in (layer_s, layer_g):
    axes[2].plot(mean_dist[li], label=f"layer {li} ({cfg.layer_types[li]})")
axes[2].axhline(window, color="gray", ls="--", lw=0.8, label="window")
axes[2].set_xlabel("query position")
axes[2].set_ylabel("mean distance to the attended keys")
axes[2].legend(fontsize=8)
nbs.show(fig, "sinks_sliding_vs_global")
beyond = {li: beyond_window(maps_lts[li]) for li in range(L)}
print(f"attention further back than the window: sliding layer {layer_s}: "
      f"{beyond[layer_s]:.4f}, global layer {layer_g}: {beyond[layer_g]:.4f}")

# %% [markdown]
# ## Removing the sinks
#
# The same forward with every sliding layer's sink logit at -1e30 (the mass it held goes back
# to the keys), then with one layer's sink removed at a time. KL(with || without) of the
# next-token distributions, averaged over positions, and the change of the text's NLL.

# %%
graphdef, state = nnx.split(model)
flat = nnx.to_flat_state(state)
main_sinks = [(p, v) for p, v in flat if p[-1] == "sinks" and p[0] != "mtp"]


def without_sinks(layer=None):
    """The model with the sinks of all main layers (or of main layer `layer`) removed."""
    from mimo_jax.model.mimo import layer_location

    where = None if layer is None else layer_location(cfg, layer)
    new = []
    for p, v in flat:
        if p[-1] == "sinks" and p[0] != "mtp":
            if where is None:
                v = v.replace(jnp.full_like(v[...], NEG))
            elif where[0] == "prefix" and p[:2] == ("prefix_layers", where[1]):
                v = v.replace(jnp.full_like(v[...], NEG))
            elif where[0] == "blocks" and p[:3] == ("blocks", "layers", where[1]):
                v = v.replace(v[...].at[where[2]].set(NEG))
        new.append((p, v))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


@nnx.jit
def log_probs(model, ids_bt):
    return jax.nn.log_softmax(model(ids_bt, compute_mtp=False).logits.astype(jnp.float32), -1)


def compare(lp_a, lp_b):
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp_a) * (lp_a - lp_b), -1)))
    top1 = float(jnp.mean(lp_a.argmax(-1) == lp_b.argmax(-1)))
    tgt = ids_bt[:, 1:, None]
    nll_a = -float(jnp.take_along_axis(lp_a[:, :-1], tgt, -1).mean())
    nll_b = -float(jnp.take_along_axis(lp_b[:, :-1], tgt, -1).mean())
    return kl, top1, nll_a, nll_b


with opened.activate():
    lp = log_probs(model, ids_bt)
    lp_without = log_probs(without_sinks(), ids_bt)
    lp_per_layer = {li: log_probs(without_sinks(li), ids_bt)
                    for li in (sliding if cfg.sliding_attention.has_sink else [])}
rows = []
kl_all, top1_all, nll, nll_all = compare(lp, lp_without)
rows.append({"sinks removed in": "all sliding layers", "KL (nats)": kl_all,
             "same top-1": top1_all, "NLL with": nll, "NLL without": nll_all})
for li, lp_li in lp_per_layer.items():
    kl, top1, _, nll_wo = compare(lp, lp_li)
    rows.append({"sinks removed in": f"layer {li}", "KL (nats)": kl, "same top-1": top1,
                 "NLL with": nll, "NLL without": nll_wo})
nbs.show_table(rows)

fig, ax = nbs.figure(figsize=(7, 3))
ax.bar([r["sinks removed in"] for r in rows], [r["KL (nats)"] for r in rows], color="tab:purple")
ax.set_ylabel("KL(with || without), nats")
ax.set_title("effect of removing the sinks on the next-token distribution")
ax.tick_params(axis="x", labelrotation=20, labelsize=8)
nbs.show(fig, "sinks_removed_kl")

# %%
summary = nbs.report(
    "attention_sinks", tokens=T, reconstruction_max_abs_err=reconstruction_err,
    sliding_layers=sliding, global_layers=global_,
    sink_mass_per_layer={str(i): float(mass_lh[i].mean()) for i in range(L)},
    sliding_beyond_window_mass=beyond[layer_s], global_beyond_window_mass=beyond[layer_g],
    kl_without_sinks=kl_all, top1_agreement_without_sinks=top1_all,
    nll_with=nll, nll_without=nll_all, cpu_seconds=nbs.cpu_seconds())
