"""Where a compiled step's time goes on XLA:CPU: per-category self time of its thunks.

`jax.profiler` records one event per executed thunk (fusion, dot, while, ...) with its HLO op
name; the optimised HLO maps that name to the JAX name stack (`op_name` metadata). For the
profile only, `install_scopes()` wraps the model's pieces in `jax.named_scope`s, so every op
lands in one category (attention projections / core, MoE grouped matmuls / dispatch, dense
MLP, norms, LM head + CE, optimizer, other) and a phase: fwd, bwd (under `transpose(...)`)
or opt. Nested thunks (loop bodies) count once: each event's children are subtracted.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

SCOPES = ("embed", "norm", "attn_qkv", "attn_core", "attn_out", "dense_mlp", "router",
          "moe_dispatch", "gmm", "lm_head_ce", "optimizer")


def _scoped(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*a, **k):
        with jax.named_scope(name):
            return fn(*a, **k)

    return wrapped


def install_scopes() -> None:
    """Wrap the model's pieces in named scopes (profiling runs only: patches the modules)."""
    import pallas_kernels
    from mimo_jax.model import attention, layers, mimo, moe
    from mimo_jax.train import loss

    attention.sharded_attention = _scoped("attn_core", attention.sharded_attention)
    attention.Attention.project_qkv = _scoped("attn_qkv", attention.Attention.project_qkv)
    attention.Attention.output = _scoped("attn_out", attention.Attention.output)
    layers.RMSNorm.__call__ = _scoped("norm", layers.RMSNorm.__call__)
    layers.DenseMLP.__call__ = _scoped("dense_mlp", layers.DenseMLP.__call__)
    moe.MoE.__call__ = _scoped("router", moe.MoE.__call__)
    moe.moe_experts = _scoped("moe_dispatch", moe.moe_experts)
    pallas_kernels.ragged_matmul = _scoped("gmm", pallas_kernels.ragged_matmul)
    mimo.MiMo.embed_tokens = _scoped("embed", mimo.MiMo.embed_tokens)
    loss.chunked_cross_entropy = _scoped("lm_head_ce", loss.chunked_cross_entropy)


def scoped_tx(tx: Any) -> Any:
    import optax

    return optax.GradientTransformation(tx.init, _scoped("optimizer", tx.update))


def category(op_name: str) -> str:
    """'<innermost scope>.<fwd|bwd|opt>' for an HLO op's JAX name stack."""
    found = [(m.start(), s) for s in SCOPES for m in re.finditer(rf"(?<!\w){s}(?!\w)", op_name)]
    cat = max(found)[1] if found else "other"
    phase = "opt" if cat == "optimizer" else ("bwd" if "transpose(" in op_name else "fwd")
    return f"{cat}.{phase}"


def _op_names(hlo_text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(
        r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo_text)}


def profile(compiled: Any, args: tuple, steps: int = 2) -> tuple[dict[str, float], list]:
    """({category: ms per step}, [(ms, op, op_name)] top 15) over ``steps`` profiled calls.

    ``compiled`` must not donate ``args`` (they are reused)."""
    names = _op_names(compiled.as_text())
    out = tempfile.mkdtemp()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(compiled(*args))
    path = glob.glob(out + "/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    self_ms = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                stack[-1]["child"] = stack[-1].get("child", 0.0) + e["dur"]
            stack.append(e)
        for e in evs:
            self_ms[e["args"]["hlo_op"]] += (e["dur"] - e.get("child", 0.0)) / 1e3 / steps
    cats: collections.Counter = collections.Counter()
    for op, ms in self_ms.items():
        cats[category(names.get(op, ""))] += ms
    top = [(round(ms, 1), op, names.get(op, "")[-90:]) for op, ms in self_ms.most_common(15)]
    return dict(cats), top


def shares(cats: dict[str, float], top: int = 12) -> list[tuple[str, float, float]]:
    """[(category, ms, percent)] of the largest ``top`` categories."""
    total = sum(cats.values())
    ranked = sorted(cats.items(), key=lambda kv: -kv[1])[:top]
    return [(k, round(v, 1), round(100 * v / total, 1)) for k, v in ranked]
