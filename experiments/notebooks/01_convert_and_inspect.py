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
# # 1. Convert and inspect a checkpoint
#
# A checkpoint in the released layout (safetensors, FP8 E4M3 weights with 128x128 block
# scales, the per-head K/V scale grid on global layers, MTP heads) is converted to Orbax and
# back; the notebook shows the tensor table by group and dtype, how much of the model is FP8,
# the memory plan for a mesh, and the logits against the PyTorch reference (transformers'
# `MiMoV2FlashForCausalLM`) when transformers is installed.
#
# `mimo-jax inspect`, `mimo-jax convert` and `mimo-jax plan` do the same from a shell.

# %% tags=["parameters"]
CHECKPOINT = None  # None: make the tiny checkpoint; else a release/HF directory
OUTPUT_DIR = None  # where the conversions go (None: a temp folder)
MESH = ""  # "" = one device for the parity forward; e.g. "fsdp=-1" on a TPU VM
TINY = True  # small sizes so that the whole notebook runs on a CPU in minutes
CONVERT = None  # release -> Orbax (FP8 kept; dequantised) -> release (None: when TINY;
# the release takes ~2 x its 300+ GB in OUTPUT_DIR)
ROUND_TRIP_TENSORS = None  # compare this many tensors byte by byte (None: all)
PLAN_MESH = "data=1,fsdp=-1,expert=8,tensor=1"  # the mesh to plan memory for
PLAN_DEVICES = 64  # chips in that mesh (a v5p-128 slice has 64)
PLAN_BATCH = 64  # global batch (sequences) and sequence length of the plan
PLAN_SEQ = 8192
PARITY = None  # compare logits with transformers (None: when TINY)

# %%
# ruff: noqa: E402  (a notebook imports in the cell that first needs it)
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

try:
    import notebook_support as nbs
except ImportError:  # the kernel started in another folder: this one sits beside the package
    import experiments

    sys.path.insert(0, os.path.join(os.path.dirname(experiments.__file__), "notebooks"))
    import notebook_support as nbs

import numpy as np

nbs.enable_compilation_cache()
PARITY = TINY if PARITY is None else PARITY
CONVERT = TINY if CONVERT is None else CONVERT
if CHECKPOINT is None:
    CHECKPOINT = nbs.tiny_checkpoint().release
OUTPUT_DIR = OUTPUT_DIR or tempfile.mkdtemp(prefix="mimo-jax-convert-")
os.makedirs(OUTPUT_DIR, exist_ok=True)
nbs.environment()

# %% [markdown]
# ## What is in the checkpoint

# %%
from mimo_jax.checkpoint.inspect import inspect

print(inspect(CHECKPOINT))

# %%
from mimo_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

GROUPS = [("MTP heads", r"^model\.mtp\."), ("experts", r"\.experts\."),
          ("router", r"\.mlp\.gate\.|e_score_correction_bias"),
          ("attention", r"self_attn\."), ("dense MLP", r"\.mlp\.(gate|up|down)_proj"),
          ("embeddings / head", r"embed_tokens|lm_head"), ("norms", r"norm")]


def group_of(name: str) -> str:
    return next((g for g, rx in GROUPS if re.search(rx, name)), "other")


ckpt = SafetensorsCheckpoint(CHECKPOINT)
table = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
fp8_params, all_params = defaultdict(int), defaultdict(int)
for name in ckpt:
    dtype = str(ckpt.dtype(name))
    shape = ckpt.shape(name)
    n = int(np.prod(shape))
    kind = "scale_inv" if name.endswith("_scale_inv") else dtype
    row = table[(group_of(name), kind)]
    row["tensors"] += 1
    row["params"] += n
    row["bytes"] += ckpt.file_of(name).nbytes(name)
    if kind != "scale_inv":
        all_params[group_of(name)] += n
        if "float8" in dtype:
            fp8_params[group_of(name)] += n
rows = [{"group": g, "dtype": d, **v, "MB": v["bytes"] / 1e6}
        for (g, d), v in sorted(table.items())]
nbs.show_table(rows, ["group", "dtype", "tensors", "params", "MB"])
fp8_fraction = sum(fp8_params.values()) / sum(all_params.values())
print(f"{sum(all_params.values()):,} parameters, {fp8_fraction:.1%} stored as FP8 E4M3")

# %%
groups = sorted(all_params, key=lambda g: -all_params[g])
dtypes = sorted({d for _, d in table})
fig, axes = nbs.figure(1, 2, figsize=(12, 3.8))
left = np.zeros(len(groups))
for d in dtypes:
    mb = np.array([table[(g, d)]["bytes"] / 1e6 if (g, d) in table else 0.0 for g in groups])
    axes[0].barh(groups, mb, left=left, label=d)
    left += mb
axes[0].invert_yaxis()
axes[0].set_xlabel("MB on disk")
axes[0].legend(fontsize=8)
axes[0].set_title("tensors by group and dtype")
cover = [fp8_params[g] / all_params[g] for g in groups]
axes[1].barh(groups, cover, color="tab:green")
axes[1].invert_yaxis()
axes[1].set_xlim(0, 1)
axes[1].set_xlabel("fraction of parameters in FP8")
axes[1].set_title(f"FP8 coverage: {fp8_fraction:.1%} of all parameters")
nbs.show(fig, "convert_tensor_groups_fp8")

# %% [markdown]
# ## Release -> Orbax -> release
#
# `keep_fp8=True` stores the E4M3 payloads and their scales as they are (half the bytes of
# bfloat16; `mimo_jax.load(..., keep_fp8=True)` computes with them), so exporting back with
# `fp8_out=True` must give the released bytes again. The dequantised Orbax form (what training
# and fine-tuning start from) is written too.

# %%
from mimo_jax.checkpoint import hf_to_orbax, orbax_to_hf


def du(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
               for f in fs) / 1e6


conversions, identical, compared = [], None, 0
if CONVERT:
    steps = [("release -> Orbax, FP8 kept", hf_to_orbax, CHECKPOINT, "orbax_fp8",
              {"keep_fp8": True}),
             ("Orbax (FP8) -> release", orbax_to_hf, "orbax_fp8", "release_again",
              {"fp8_out": True}),
             ("release -> Orbax, dequantised", hf_to_orbax, CHECKPOINT, "orbax_float",
              {"dtype": "float32" if TINY else "bfloat16"})]
    for title, fn, src, dst, kw in steps:
        src = src if os.path.isabs(src) else os.path.join(OUTPUT_DIR, src)
        t0 = time.perf_counter()
        fn(src, os.path.join(OUTPUT_DIR, dst), overwrite=True, progress=False, **kw)
        conversions.append({"step": title, "seconds": time.perf_counter() - t0,
                            "MB written": du(os.path.join(OUTPUT_DIR, dst))})
    nbs.show_table(conversions)

    again = SafetensorsCheckpoint(os.path.join(OUTPUT_DIR, "release_again"))
    names = sorted(ckpt)
    if ROUND_TRIP_TENSORS is not None:
        names = names[:: max(len(names) // ROUND_TRIP_TENSORS, 1)]
    assert set(again) == set(ckpt), sorted(set(again) ^ set(ckpt))[:10]
    different = [n for n in names if not (
        again.dtype(n) == ckpt.dtype(n) and again.shape(n) == ckpt.shape(n)
        and np.array_equal(again.get(n).view(np.uint8), ckpt.get(n).view(np.uint8)))]
    compared, identical = len(names), not different
    print(f"round trip: {compared} tensors compared byte by byte, "
          f"{len(different)} differ {different[:5]}")

# %% [markdown]
# ## Memory plan
#
# Bytes per device for training (float32 master weights, AdamW, bfloat16 activations, full
# rematerialisation) and for serving (weights + KV cache) on `PLAN_MESH`, for this checkpoint's
# configuration and, for scale, the released MiMo-V2-Flash.

# %%
from mimo_jax import ModelConfig
from mimo_jax.parallel import format_plan, plan_memory
from mimo_jax.parallel.plan import CHIPS_GIB
from mimo_jax.sharding import ShardingRules, mesh_shape

shape = mesh_shape(PLAN_MESH, PLAN_DEVICES)
rules = ShardingRules.preset("fsdp_tensor_expert")
configs = {"this checkpoint": ModelConfig.from_hf(CHECKPOINT),
           "MiMo-V2-Flash": ModelConfig.flash()}
plans = {k: plan_memory(c, shape, rules, batch=PLAN_BATCH, seq=PLAN_SEQ)
         for k, c in configs.items()}
print(f"mesh {shape}, batch {PLAN_BATCH} x seq {PLAN_SEQ}")
for k, p in plans.items():
    print(f"\n{k}:\n{format_plan(p)}")

GIB = 2**30
parts = ["params", "grads", "optimizer", "activations", "kv_cache"]
fig, axes = nbs.figure(1, 2, figsize=(11, 3.5))
for ax, (k, p) in zip(axes, plans.items(), strict=True):
    left = 0.0
    for part in parts[:4]:
        ax.barh(["train"], [getattr(p, part) / GIB], left=left, label=part)
        left += getattr(p, part) / GIB
    ax.barh(["serve"], [p.params / GIB], color="tab:blue")
    ax.barh(["serve"], [p.kv_cache / GIB], left=p.params / GIB, color="tab:purple",
            label="kv_cache")
    for chip in ("v5e", "v5p", "H200"):
        if CHIPS_GIB[chip] < 1.5 * max(p.train_total, p.serve_total) / GIB:
            ax.axvline(0.9 * CHIPS_GIB[chip], ls="--", lw=0.8, color="gray")
            ax.text(0.9 * CHIPS_GIB[chip], 1.45, f"90% {chip}", fontsize=7, ha="center")
    ax.set_xlabel("GiB per device")
    ax.set_title(f"{k}: {p.devices} devices", fontsize=10)
axes[0].legend(fontsize=7)
nbs.show(fig, "convert_memory_plan")

# %% [markdown]
# ## Logits against transformers
#
# transformers reads the dequantised weights (the float export of the Orbax copy), mimo-jax
# reads the FP8 release and dequantises while loading: both compute in float32 on the same
# weights, so their logits should agree to float32 rounding.

# %%
import jax.numpy as jnp

import mimo_jax

parity_err = None
try:
    import torch
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM
except ImportError:
    torch = None
    print("transformers/torch are not installed: skipping the parity check "
          "(pip install -e '.[test]' -c constraints.txt)")
if PARITY and torch is not None:
    float_release = os.path.join(OUTPUT_DIR, "release_float")
    if not CONVERT:
        hf_to_orbax(CHECKPOINT, os.path.join(OUTPUT_DIR, "orbax_float"), dtype="float32",
                    overwrite=True, progress=False)
    orbax_to_hf(os.path.join(OUTPUT_DIR, "orbax_float"), float_release, overwrite=True,
                progress=False)
    cfg = configs["this checkpoint"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 48))
    # transformers 5.23 takes RoPE from its `rope_parameters` (defaults: the release's
    # theta and partial factor 0.334) and not from the hub's top-level keys: spell ours its way.
    hf_config = MiMoV2FlashConfig.from_pretrained(float_release)
    hf_config.rope_parameters = {
        f"{kind}_attention": {"rope_type": "default", "rope_theta": spec.rope_theta,
                              "partial_rotary_factor": spec.partial_rotary_factor}
        for kind, spec in (("full", cfg.full_attention), ("sliding", cfg.sliding_attention))}
    reference = MiMoV2FlashForCausalLM.from_pretrained(float_release, config=hf_config,
                                                       dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)).logits.numpy()
    mesh = mimo_jax.sharding.make_mesh(MESH) if MESH else None
    ours = mimo_jax.load(CHECKPOINT, dtype="float32", mesh=mesh)
    got = np.asarray(ours(jnp.asarray(ids), compute_mtp=False).logits)
    err_bt = np.abs(got - ref).max(-1)
    parity_err = float(err_bt.max())
    print(f"max |logits(mimo-jax) - logits(transformers)| = {parity_err:.2e} "
          f"(logits span {ref.min():.1f}..{ref.max():.1f})")
    fig, axes = nbs.figure(1, 2, figsize=(11, 3.5))
    axes[0].scatter(ref.reshape(-1)[::7], got.reshape(-1)[::7], s=2, alpha=0.4)
    axes[0].set_xlabel("transformers logits")
    axes[0].set_ylabel("mimo-jax logits")
    axes[0].set_title("same weights, two implementations")
    for b in range(err_bt.shape[0]):
        axes[1].semilogy(np.maximum(err_bt[b], 1e-12), label=f"row {b}")
    axes[1].axhline(1e-4, color="red", ls="--", lw=0.8, label="1e-4")
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("max |difference| over the vocabulary")
    axes[1].legend(fontsize=8)
    nbs.show(fig, "convert_parity")

# %%
summary = nbs.report(
    "convert_and_inspect", tensors=len(list(ckpt)), parameters=sum(all_params.values()),
    fp8_fraction=fp8_fraction, fp8_by_group={g: fp8_params[g] / all_params[g] for g in groups},
    round_trip_identical=identical, tensors_compared=compared, conversions=conversions,
    plan_devices=plans["this checkpoint"].devices,
    plan_params_gib=plans["this checkpoint"].params / GIB,
    flash_train_gib_per_device=plans["MiMo-V2-Flash"].train_total / GIB,
    parity_max_abs_err=parity_err, cpu_seconds=nbs.cpu_seconds())
