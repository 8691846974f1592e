"""The MoE expert computation over a device mesh (expert + tensor + FSDP parallelism).

Inside `shard_map`, each device holds a contiguous slice of the experts (mesh axis "expert"),
a slice of each expert's hidden width ("tensor") and a slice of the model width ("fsdp",
gathered here as FSDP does). Tokens travel by all-gather over "expert" and come back by
reduce-scatter: every device runs `expert_ffn` for its local experts on the tokens of its
expert-axis peers (dropless), and the partial sums are scattered back to the token owners.
This collective pair runs on every backend, XLA:CPU included; `ragged_all_to_all` (less
traffic at large expert counts) is not implemented on CPU and is not used yet.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mimo_jax.model.moe_dispatch import ExpertFFNOutput, expert_ffn
from mimo_jax.sharding.rules import active, axis_size


def _nontrivial(mesh, axes) -> tuple[str, ...]:
    return tuple(a for a in axes if axis_size(mesh, a) > 1)


def moe_experts(
    x_td: jax.Array,
    ids_tk: jax.Array,
    weights_tk: jax.Array,
    gate_up_edfc: jax.Array,
    down_efd: jax.Array,
    *,
    num_experts: int,
    capacity_factor: float | None,
) -> ExpertFFNOutput:
    """`expert_ffn` on one device, or spread over the active mesh (see
    `mimo_jax.sharding.activate`)."""
    ctx = active()
    if ctx is None:
        return expert_ffn(x_td, ids_tk, weights_tk, gate_up_edfc, down_efd,
                          num_experts=num_experts, capacity_factor=capacity_factor)
    mesh, rules = ctx
    t = x_td.shape[0]
    expert_axes = _nontrivial(mesh, rules.mesh_axes("experts"))
    mlp_axes = _nontrivial(mesh, rules.mesh_axes("expert_mlp"))
    embed_axes = _nontrivial(mesh, rules.mesh_axes("embed"))
    # Tokens [B*T] are split over the batch axes, then the sequence's (context parallelism).
    token_axes = _nontrivial(mesh, rules.mesh_axes("batch") + rules.mesh_axes("seq"))
    while token_axes and t % math.prod(mesh.shape[a] for a in token_axes):
        token_axes = token_axes[:-1]  # e.g. a single sequence while generating
    tokens_split_over_experts = set(expert_axes) <= set(token_axes) and expert_axes

    tok = PartitionSpec(token_axes or None, None)
    w_spec = PartitionSpec(expert_axes or None, embed_axes or None, mlp_axes or None, None)
    down_spec = PartitionSpec(expert_axes or None, mlp_axes or None, embed_axes or None)
    e_local = gate_up_edfc.shape[0] // math.prod(mesh.shape[a] for a in expert_axes)

    def local(x, ids, w, gate_up, down):
        if embed_axes:  # FSDP: gather this layer's expert weights over the model width
            gate_up = jax.lax.all_gather(gate_up, embed_axes, axis=1, tiled=True)
            down = jax.lax.all_gather(down, embed_axes, axis=2, tiled=True)
        if tokens_split_over_experts:
            x = jax.lax.all_gather(x, expert_axes, axis=0, tiled=True)
            ids = jax.lax.all_gather(ids, expert_axes, axis=0, tiled=True)
            w = jax.lax.all_gather(w, expert_axes, axis=0, tiled=True)
        offset = jax.lax.axis_index(expert_axes) * e_local if expert_axes else 0
        out = expert_ffn(x, ids, w, gate_up, down, group_offset=offset,
                         num_experts=num_experts, capacity_factor=capacity_factor)
        y = out.y_td.astype(jnp.float32)
        if mlp_axes:  # each device summed over its slice of the hidden width
            y = jax.lax.psum(y, mlp_axes)
        if tokens_split_over_experts:
            y = jax.lax.psum_scatter(y, expert_axes, scatter_dimension=0, tiled=True)
        elif expert_axes:
            y = jax.lax.psum(y, expert_axes)
        count_axes = tuple(a for a in mesh.axis_names if a not in mlp_axes and mesh.shape[a] > 1
                           and (a in expert_axes or a in token_axes))
        dropped = jax.lax.psum(out.num_dropped, count_axes) if count_axes else out.num_dropped
        return y.astype(x.dtype), dropped

    y, dropped = jax.shard_map(
        local, mesh=mesh,
        in_specs=(tok, tok, tok, w_spec, down_spec),
        out_specs=(tok, PartitionSpec()),
        check_vma=False,
    )(x_td, ids_tk, weights_tk, gate_up_edfc, down_efd)
    return ExpertFFNOutput(y, dropped)
