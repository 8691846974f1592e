"""Per-device memory plan for training or serving a config on a mesh, from abstract shapes.

Nothing is allocated: parameter shapes come from `abstract_model`, their split from the sharding
rules, and activations / KV cache from closed-form counts documented below. This is how a user
sizes a pod before paying for it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import nnx

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.fp8_linear import scale_shape, stored_layout
from mimo_jax.model.layers import RouterBias
from mimo_jax.model.mimo import scan_plan
from mimo_jax.model.shapes import abstract_model
from mimo_jax.sharding.rules import ShardingRules, axes_of

CHIPS_GIB = {"v5e": 16, "v6e": 32, "H100": 80, "v5p": 95, "H200": 141}
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    devices: int
    params_total_bytes: int  # all parameters once, unsharded
    params: int  # bytes per device, like the rest
    grads: int
    optimizer: int
    activations: int
    kv_cache: int
    replicated_fraction: float

    @property
    def train_total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def serve_total(self) -> int:
        return self.params + self.kv_cache

    def fits(self, chip: str, *, training: bool = True, headroom: float = 0.9) -> bool:
        need = self.train_total if training else self.serve_total
        return need <= headroom * CHIPS_GIB[chip] * GIB


def _ways(spec_axes: tuple, mesh_shape: dict[str, int]) -> int:
    return math.prod(mesh_shape[a] for s in spec_axes if s
                     for a in ((s,) if isinstance(s, str) else s))


def plan_memory(
    cfg: ModelConfig,
    mesh_shape: dict[str, int],
    rules: ShardingRules,
    *,
    batch: int,
    seq: int,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    optimizer_bytes: int = 8,
    compute_bytes: int = 2,
    remat: str = "full",
    loss_chunk: int = 4096,
) -> MemoryPlan:
    """Bytes per device. Defaults: float32 master weights and gradients, AdamW (two float32
    moments), bfloat16 activations, full rematerialisation per layer.

    Activations (per device, tokens = batch * seq / batch-parallel ways):
    - remat "full": each layer keeps its input [tokens, D]; one layer's working set is live
      during its recomputation (the largest of attention and MoE intermediates below);
    - remat "none": every layer keeps its intermediates: normed input, q/k/v/attention output
      (heads split over tensor), and for MoE the routed copies [tokens*K, D], the gate/up
      output [tokens*K, 2F/tensor] and its SwiGLU [tokens*K, F/tensor].
    Plus the loss: a float32 [loss_chunk, V/tensor] logits chunk (chunked cross-entropy).
    With a `context` mesh axis (rules map "seq" to it) each device holds seq/context tokens
    of its rows, and a global layer may gather one whole sequence's K/V (the all-gather
    variant of context-parallel attention) on top of its working set.
    """
    state = nnx.state(abstract_model(cfg))
    devices = math.prod(mesh_shape.values())
    total = per_device = replicated = 0
    for path, var in nnx.to_flat_state(state):
        n = int(np.prod(var.shape))
        bytes_ = n * (4 if isinstance(var, RouterBias) else param_bytes)
        ways = _ways(tuple(rules.spec(axes_of(var), where="/".join(map(str, path)))),
                     mesh_shape)
        total += bytes_
        per_device += bytes_ // ways
        replicated += bytes_ if ways == 1 else 0
    elems_per_device = per_device // param_bytes

    batch_ways = _usable_ways(rules.mesh_axes("batch"), mesh_shape, batch)
    tensor = _usable_ways(rules.mesh_axes("q_heads"), mesh_shape,
                          cfg.sliding_attention.num_heads)
    seq_ways = _seq_ways(rules, mesh_shape, seq)
    tokens = batch * seq // batch_ways // seq_ways
    d, k, f = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    spec = cfg.sliding_attention
    attn = tokens * (2 * d + (spec.num_heads * (spec.head_dim + spec.v_head_dim)
                              + 2 * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim))
                     // tensor)
    moe = tokens * (d + k * (2 * d + 3 * f // tensor))
    dense = tokens * (d + 3 * cfg.intermediate_size // tensor)
    layer = max(attn + moe, attn + dense)
    if seq_ways > 1:  # one layer's gathered K/V of its rows' whole sequences
        g = cfg.full_attention
        rows = max(batch // batch_ways, 1)
        layer += rows * seq * g.num_kv_heads * (g.head_dim + g.v_head_dim) // tensor
    layers = cfg.num_layers + cfg.num_mtp_layers
    if remat == "full":
        acts = (layers * tokens * d + layer) * compute_bytes
    else:
        acts = layers * layer * compute_bytes
    acts += min(loss_chunk, tokens) * cfg.vocab_size // tensor * 4

    kv = 0
    for layer_type in list(cfg.layer_types) + ["sliding"] * cfg.num_mtp_layers:
        s = cfg.attention_spec(layer_type)
        length = seq if s.window is None else min(seq, s.window)
        kv_split = _usable_ways(rules.mesh_axes("kv_heads"), mesh_shape, s.num_kv_heads)
        kv += batch * length * s.num_kv_heads * (s.head_dim + s.v_head_dim) // kv_split
    kv = kv * compute_bytes // batch_ways

    return MemoryPlan(
        devices=devices,
        params_total_bytes=total,
        params=per_device,
        grads=elems_per_device * grad_bytes,
        optimizer=elems_per_device * optimizer_bytes,
        activations=acts,
        kv_cache=kv,
        replicated_fraction=replicated / total,
    )


# The release's FP8 tensors (checkpoint.md §2): q/k/v, dense MLPs and experts, MTP heads too.
FP8_PARAMS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "gate_up",
              "down")


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """Bytes per device of serving (generation) with the weights in `weights` format."""

    devices: int
    weights: str  # "fp8" (kept as in the release) or "bf16"
    batch: int
    context: int
    params: int  # weights (FP8 payloads + scales, the rest bf16; routers float32)
    kv_cache: int  # main layers (global: full context, sliding: window) + MTP heads, bf16
    transient: int  # the largest dequantised weight one layer needs if XLA does not fuse it
    params_total_bytes: int  # all weights once, unsharded

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.transient

    def fits(self, chip: str, *, headroom: float = 0.9) -> bool:
        return self.total <= headroom * CHIPS_GIB[chip] * GIB


def _spec_ways(rules: ShardingRules, axes: tuple, mesh_shape: dict[str, int]) -> int:
    return _ways(tuple(rules.spec(axes)), mesh_shape)


def plan_serving(
    cfg: ModelConfig,
    mesh_shape: dict[str, int],
    rules: ShardingRules,
    *,
    batch: int,
    context: int,
    weights: str = "fp8",
    kv_bytes: int = 2,
    mtp_heads: int | None = None,
) -> ServingPlan:
    """Per-device memory of generating `batch` sequences of up to `context` tokens.

    Weights: with "fp8", the release's quantised parameters (`FP8_PARAMS`) take 1 byte per
    weight plus their float32 128x128 block scales (64-row blocks for the global layers'
    K/V), laid out as `mimo_jax.model.fp8_linear` keeps them (scales replicated except over
    experts); everything else bf16, routers float32. KV cache: `kv_bytes` per element, rows
    over the batch axes and KV heads over the head axes where they divide (as
    `mimo_jax.inference` shards it); `mtp_heads` (default all) heads' sliding caches.
    Transient: with FP8, the largest single dequantised parameter a layer may materialise
    (experts of one layer) in case XLA does not fuse the dequantisation into its matmul.
    """
    if weights not in ("fp8", "bf16"):
        raise ValueError(f"weights must be 'fp8' or 'bf16', got {weights!r}")
    state = nnx.state(abstract_model(cfg))
    devices = math.prod(mesh_shape.values())
    per_device = total = transient = 0
    for path, var in nnx.to_flat_state(state):
        axes = axes_of(var)
        n = int(np.prod(var.shape))
        ways = _spec_ways(rules, axes, mesh_shape)
        if isinstance(var, RouterBias) or path[-1] == "router":
            per_device += n * 4 // ways
            total += n * 4
            continue
        if weights == "bf16" or path[-1] not in FP8_PARAMS:
            per_device += n * 2 // ways
            total += n * 2
            continue
        stacked = axes[0] == "layers"
        inner_shape, inner_axes = var.shape[int(stacked):], axes[int(stacked):]
        full_kv = path[-1] in ("k_proj", "v_proj") and _is_full(cfg, path)
        p_shape, p_axes, blocks = stored_layout(inner_shape, inner_axes, 64 if full_kv else 128)
        s_elems = int(np.prod(scale_shape(p_shape, blocks)))
        s_axes = tuple(a if b == 1 else None for a, b in zip(p_axes, blocks, strict=True))
        s_ways = _spec_ways(rules, s_axes, mesh_shape)
        lead = var.shape[0] if stacked else 1
        per_device += n // ways + lead * s_elems * 4 // s_ways
        total += n + lead * s_elems * 4
        transient = max(transient, (n // lead) * 2 // ways)

    batch_ways = _usable_ways(rules.mesh_axes("batch"), mesh_shape, batch)
    heads = list(cfg.layer_types) + ["sliding"] * (
        cfg.num_mtp_layers if mtp_heads is None else mtp_heads)
    kv = 0
    for layer_type in heads:
        s = cfg.attention_spec(layer_type)
        length = context if s.window is None else min(context, s.window)
        kv_split = _usable_ways(rules.mesh_axes("kv_heads"), mesh_shape, s.num_kv_heads)
        kv += (batch // batch_ways) * length * (s.num_kv_heads // kv_split) * (
            s.head_dim + s.v_head_dim) * kv_bytes
    return ServingPlan(devices=devices, weights=weights, batch=batch, context=context,
                       params=per_device, kv_cache=kv, transient=transient,
                       params_total_bytes=total)


def _seq_ways(rules: ShardingRules, mesh_shape: dict[str, int], seq: int) -> int:
    """How many ways the sequence is split (the `context` axis); 1 for rules without "seq"."""
    try:
        axes = rules.mesh_axes("seq")
    except Exception:  # rules from before context parallelism have no "seq" entry
        return 1
    return _usable_ways(tuple(axes), mesh_shape, seq)


def kv_cache_bytes(
    cfg: ModelConfig,
    mesh_shape: dict[str, int],
    rules: ShardingRules,
    *,
    batch: int,
    context: int,
    kv_bytes: int = 2,
    mtp_heads: int | None = None,
    windowed: bool = True,
) -> dict[str, int]:
    """Per-device KV-cache bytes of `batch` sequences of `context` tokens, by where they sit:
    {"full": global layers (every position), "sliding": sliding layers (a ring of `window`
    slots each), "mtp": the MTP heads' rings, "total"} (the layout of
    `mimo_jax.inference.kv_cache`; rows over the batch axes, KV heads over the head axes where
    they divide, as in `plan_serving`). `windowed=False`: sliding layers keep every position.
    """
    batch_ways = _usable_ways(rules.mesh_axes("batch"), mesh_shape, batch)
    n_mtp = cfg.num_mtp_layers if mtp_heads is None else mtp_heads
    out = {"full": 0, "sliding": 0, "mtp": 0}
    for where, layer_type in [(t, t) for t in cfg.layer_types] + [("mtp", "sliding")] * n_mtp:
        s = cfg.attention_spec(layer_type)
        length = context if s.window is None or not windowed else min(context, s.window)
        kv_split = _usable_ways(rules.mesh_axes("kv_heads"), mesh_shape, s.num_kv_heads)
        out[where] += (batch // batch_ways) * length * (s.num_kv_heads // kv_split) * (
            s.head_dim + s.v_head_dim) * kv_bytes
    out["total"] = out["full"] + out["sliding"] + out["mtp"]
    return out


@dataclasses.dataclass(frozen=True)
class LongContextRow:
    """Serving at one context length: the hybrid model's cache against all-global ones."""

    context: int
    kv: dict[str, int]  # kv_cache_bytes of the model as configured
    kv_all_global: int  # every main layer global (the global layers' geometry), same MTP heads
    kv_unwindowed: int  # every layer as configured but no window (sliding layers keep all)
    serve_total: int  # weights + hybrid KV cache + the transient dequantised layer

    @property
    def saving(self) -> float:
        """All-global over hybrid main-layer cache (the report's "nearly 6x")."""
        main = self.kv["full"] + self.kv["sliding"]
        return self.kv_all_global / main if main else float("nan")


@dataclasses.dataclass(frozen=True)
class LongContextPlan:
    serving: ServingPlan  # at the first context (weights do not depend on it)
    rows: tuple[LongContextRow, ...]

    def fits(self, row: LongContextRow, chip: str, *, headroom: float = 0.9) -> bool:
        return row.serve_total <= headroom * CHIPS_GIB[chip] * GIB


def plan_long_context(
    cfg: ModelConfig,
    mesh_shape: dict[str, int],
    rules: ShardingRules,
    *,
    contexts: tuple[int, ...] = (32_768, 131_072, 262_144),
    batch: int = 1,
    weights: str = "fp8",
    kv_bytes: int = 2,
) -> LongContextPlan:
    """Serving memory per device at each context length, with the KV cache split by layer
    type and compared with the same model made all-global (every main layer a global layer,
    `kv_all_global`) and with its sliding layers un-windowed (`kv_unwindowed`)."""
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive token counts, got {contexts!r}")
    serving = plan_serving(cfg, mesh_shape, rules, batch=batch, context=contexts[0],
                           weights=weights, kv_bytes=kv_bytes)
    all_global = cfg.replace(layer_types=("full",) * cfg.num_layers)
    rows = []
    for c in contexts:
        kv = kv_cache_bytes(cfg, mesh_shape, rules, batch=batch, context=c, kv_bytes=kv_bytes)
        g = kv_cache_bytes(all_global, mesh_shape, rules, batch=batch, context=c,
                           kv_bytes=kv_bytes, mtp_heads=0)
        u = kv_cache_bytes(cfg, mesh_shape, rules, batch=batch, context=c,
                           kv_bytes=kv_bytes, mtp_heads=0, windowed=False)
        rows.append(LongContextRow(
            context=c, kv=kv, kv_all_global=g["total"], kv_unwindowed=u["total"],
            serve_total=serving.params + serving.transient + kv["total"]))
    return LongContextPlan(serving, tuple(rows))


def format_long_context(plan: LongContextPlan, chip: str = "H200") -> str:
    """The table `mimo-jax plan --contexts` prints."""
    sp = plan.serving
    gib = CHIPS_GIB[chip]
    out = [f"long-context serving: {sp.batch} sequence(s), {sp.weights} weights "
           f"({sp.params / GIB:.2f} GiB per device), bf16-sized KV, {sp.devices} devices; "
           "KV per device in GiB",
           f"{'context':>8} {'global':>8} {'sliding':>8} {'mtp':>6} {'KV total':>9} "
           f"{'all-global':>11} {'saving':>7} {'no-window':>10} {'serve total':>12} "
           f"{'fits ' + chip:>10}"]
    for r in plan.rows:
        out.append(
            f"{r.context:>8} {r.kv['full'] / GIB:>8.3f} {r.kv['sliding'] / GIB:>8.4f} "
            f"{r.kv['mtp'] / GIB:>6.4f} {r.kv['total'] / GIB:>9.3f} "
            f"{r.kv_all_global / GIB:>11.3f} {r.saving:>6.2f}x {r.kv_unwindowed / GIB:>10.3f} "
            f"{r.serve_total / GIB:>12.2f} {'yes' if plan.fits(r, chip) else 'no':>10}")
    out.append(f"saving = all-global main-layer KV / hybrid main-layer KV (global + sliding "
               f"rings); fits = serve total <= 90% of {gib} GiB")
    return "\n".join(out)


def _is_full(cfg: ModelConfig, path: tuple) -> bool:
    """Whether a parameter path belongs to a global-attention layer."""
    if path[0] == "prefix_layers":
        return cfg.layer_types[path[1]] == "full"
    if path[0] == "blocks":
        plan = scan_plan(cfg)
        return cfg.layer_types[plan.num_prefix + path[2]] == "full"
    return False  # MTP heads are sliding-window layers


def format_serving(plan: ServingPlan) -> str:
    rows = [(f"weights ({plan.weights})", plan.params), ("KV cache", plan.kv_cache),
            ("dequantised layer (transient)", plan.transient), ("serving total", plan.total)]
    out = [f"serving {plan.batch} x {plan.context} tokens, {plan.weights} weights on "
           f"{plan.devices} devices; all weights once: {plan.params_total_bytes / GIB:,.1f} GiB",
           f"{'per device':<32}{'GiB':>10}"]
    out += [f"{name:<32}{value / GIB:>10.2f}" for name, value in rows]
    fits = ", ".join(f"{chip} ({gib} GiB): {'yes' if plan.fits(chip) else 'no'}"
                     for chip, gib in CHIPS_GIB.items())
    out.append(f"fits (90% of HBM): {fits}")
    return "\n".join(out)


def _usable_ways(axes: tuple[str, ...], mesh_shape: dict[str, int], size: int) -> int:
    """How many ways `size` is split over `axes` (axes that do not divide it are dropped)."""
    axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
    while axes and size % math.prod(mesh_shape[a] for a in axes):
        axes = axes[:-1]
    return math.prod(mesh_shape[a] for a in axes)


def format_plan(plan: MemoryPlan) -> str:
    rows = [("parameters", plan.params), ("gradients", plan.grads),
            ("optimizer state", plan.optimizer), ("activations", plan.activations),
            ("training total", plan.train_total), ("KV cache (serving)", plan.kv_cache),
            ("serving total", plan.serve_total)]
    out = [f"devices: {plan.devices}; all parameters once: {plan.params_total_bytes / GIB:,.1f} "
           f"GiB; replicated fraction of parameter bytes: {plan.replicated_fraction:.4%}",
           f"{'per device':<22}{'GiB':>10}"]
    out += [f"{name:<22}{value / GIB:>10.2f}" for name, value in rows]
    fits = ", ".join(
        f"{chip} ({gib} GiB): train {'yes' if plan.fits(chip) else 'no'}, serve "
        f"{'yes' if plan.fits(chip, training=False) else 'no'}"
        for chip, gib in CHIPS_GIB.items())
    out.append(f"fits (90% of HBM): {fits}")
    return "\n".join(out)
