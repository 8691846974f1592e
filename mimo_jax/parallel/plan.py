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
from mimo_jax.model.layers import RouterBias
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
    tokens = batch * seq // batch_ways
    d, k, f = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    spec = cfg.sliding_attention
    attn = tokens * (2 * d + (spec.num_heads * (spec.head_dim + spec.v_head_dim)
                              + 2 * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim))
                     // tensor)
    moe = tokens * (d + k * (2 * d + 3 * f // tensor))
    dense = tokens * (d + 3 * cfg.intermediate_size // tensor)
    layer = max(attn + moe, attn + dense)
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
