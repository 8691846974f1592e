"""Attention layer: GQA with per-type geometry, partial RoPE, value scale and optional sinks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

import pallas_kernels
from mimo_jax.model import context_parallel
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.layers import apply_partial_rope, linear, param
from mimo_jax.sharding.rules import active, axis_size


def _dividing_axes(mesh, axes, *sizes) -> tuple[str, ...]:
    """The leading mesh axes (of size > 1) whose product divides every one of ``sizes``."""
    axes = tuple(a for a in axes if axis_size(mesh, a) > 1)
    while axes and any(s % math.prod(mesh.shape[a] for a in axes) for s in sizes):
        axes = axes[:-1]
    return axes


def sharded_attention(q_btnh, k_btkh, v_btkh, *, sinks, window, segment_ids):
    """`pallas_kernels.attention`, run per shard when a mesh is active.

    Attention is independent per sequence and per KV-head group, so each device attends its
    own rows and heads (``shard_map``); Pallas kernels cannot be partitioned by XLA.
    A sequence split over the `context` axis (in the zig-zag order the model entered) goes to
    `context_parallel.context_attention`: a K/V halo for sliding layers, all-gather or ring
    for global ones.
    """
    ctx = active()
    call = lambda q, k, v, s, seg: pallas_kernels.attention(  # noqa: E731
        q, k, v, sinks=s, window=window, segment_ids=seg)
    if ctx is None:
        return call(q_btnh, k_btkh, v_btkh, sinks, segment_ids)
    mesh, rules = ctx
    batch = _dividing_axes(mesh, rules.mesh_axes("batch"), q_btnh.shape[0]) or None
    heads = _dividing_axes(mesh, rules.mesh_axes("q_heads"), q_btnh.shape[2],
                           k_btkh.shape[2]) or None
    layout = context_parallel.current_layout(q_btnh.shape[1])
    if layout is not None:
        return context_parallel.context_attention(
            q_btnh, k_btkh, v_btkh, sinks=sinks, window=window, segment_ids=segment_ids,
            layout=layout, batch_axes=batch or (), head_axes=heads or ())
    qkv = PartitionSpec(batch, None, heads, None)
    in_specs = (qkv, qkv, qkv, None if sinks is None else PartitionSpec(heads),
                None if segment_ids is None else PartitionSpec(batch, None))
    return jax.shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=qkv, check_vma=False)(
        q_btnh, k_btkh, v_btkh, sinks, segment_ids)


class Attention(nnx.Module):
    def __init__(
        self,
        spec: AttentionSpec,
        hidden_size: int,
        value_scale: float,
        *,
        std: float,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        d, n, k = hidden_size, spec.num_heads, spec.num_kv_heads
        self.spec = spec
        self.value_scale = value_scale
        self.q_proj = param(rngs, (d, n, spec.head_dim), ("embed", "q_heads", "head_dim"),
                            param_dtype, std=std)
        self.k_proj = param(rngs, (d, k, spec.head_dim), ("embed", "kv_heads", "head_dim"),
                            param_dtype, std=std)
        self.v_proj = param(rngs, (d, k, spec.v_head_dim), ("embed", "kv_heads", "head_dim"),
                            param_dtype, std=std)
        self.o_proj = param(rngs, (n, spec.v_head_dim, d), ("q_heads", "head_dim", "embed"),
                            param_dtype, std=std)
        # A learned per-query-head logit that joins the softmax denominator only.
        self.sinks = (
            param(rngs, (n,), ("q_heads",), param_dtype, std=std) if spec.has_sink else None
        )

    def project_qkv(
        self, x_btd: jax.Array, positions_bt: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries and keys after RoPE, values after the value scale (what a KV cache stores)."""
        dt = x_btd.dtype
        spec = self.spec
        # `linear`: 2-D matmuls (einsum over (b, t) is ~2x slower fwd+bwd on XLA:CPU).
        q_btnh = linear(x_btd, self.q_proj[...])
        k_btkh = linear(x_btd, self.k_proj[...])
        v_btkh = linear(x_btd, self.v_proj[...])
        v_btkh = v_btkh * jnp.asarray(self.value_scale, dt)
        q_btnh = apply_partial_rope(q_btnh, positions_bt, spec.rotary_dim, spec.rope_theta)
        k_btkh = apply_partial_rope(k_btkh, positions_bt, spec.rotary_dim, spec.rope_theta)
        return q_btnh, k_btkh, v_btkh

    def output(self, o_btnh: jax.Array) -> jax.Array:
        return linear(o_btnh, self.o_proj[...], contract=2)

    def __call__(
        self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array | None
    ) -> jax.Array:
        q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd, positions_bt)
        o_btnh = sharded_attention(
            q_btnh,
            k_btkh,
            v_btkh,
            sinks=None if self.sinks is None else self.sinks[...].astype(jnp.float32),
            window=self.spec.window,
            segment_ids=segment_ids_bt,
        )
        return self.output(o_btnh)
