"""Attention layer: GQA with per-type geometry, partial RoPE, value scale and optional sinks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.layers import apply_partial_rope, param


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
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.q_proj[...].astype(dt))
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.k_proj[...].astype(dt))
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.v_proj[...].astype(dt))
        v_btkh = v_btkh * jnp.asarray(self.value_scale, dt)
        q_btnh = apply_partial_rope(q_btnh, positions_bt, spec.rotary_dim, spec.rope_theta)
        k_btkh = apply_partial_rope(k_btkh, positions_bt, spec.rotary_dim, spec.rope_theta)
        return q_btnh, k_btkh, v_btkh

    def output(self, o_btnh: jax.Array) -> jax.Array:
        return jnp.einsum("btnh,nhd->btd", o_btnh, self.o_proj[...].astype(o_btnh.dtype))

    def __call__(
        self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array | None
    ) -> jax.Array:
        q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd, positions_bt)
        o_btnh = pallas_kernels.attention(
            q_btnh,
            k_btkh,
            v_btkh,
            sinks=None if self.sinks is None else self.sinks[...].astype(jnp.float32),
            window=self.spec.window,
            segment_ids=segment_ids_bt,
        )
        return self.output(o_btnh)
