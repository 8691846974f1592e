"""Block-quantised FP8 weights kept on device, dequantised where they are used.

The release stores q/k/v, the dense MLPs and every expert as E4M3 with float32 128x128
`weight_scale_inv` blocks (checkpoint.md §4). `FP8Weight` holds that payload (1 byte per
weight) and its scales in the model's own parameter layout and stands in for the parameter:
`module.q_proj[...]` returns the dequantised weight, so the model's einsums run unchanged and
XLA fuses the convert-and-scale into the matmul's operand (on CPU it materialises one layer's
weight at a time). Memory held between steps is the FP8 payload plus 1/4096 of it in scales.

Layout: the payload has the parameter's shape, except that a [D, N, H] head projection is
stored as [D, N*H] (its quantisation blocks run across heads); `scale_inv` has the same rank
with each blocked dimension divided by its block (`blocks[i]`, 1 = unblocked; the last block
may be partial). Row blocks are 128, or 64 for the global layers' K/V, whose per-head grid
(K's last block shared with V's first 64 rows) is exact on a 64-row grid.

`dequantize(...)` computes in float32 and rounds once to the parameter dtype, so an FP8 model
equals the model loaded with the same weights dequantised on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

E4M3 = jnp.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = 128
# Logical axes whose dimension is quantised in blocks, and the head axes stored flattened.
_BLOCKED = {"embed", "mlp", "expert_mlp"}
_HEADS = {"q_heads", "kv_heads"}


class FP8Payload(nnx.Variable):
    """E4M3 weight payload (not trained: not an `nnx.Param`)."""


class FP8Scale(nnx.Variable):
    """float32 block scales (`weight_scale_inv`) of an `FP8Payload`."""


def stored_layout(shape: Sequence[int], axes: Sequence[str | None], row_block: int = BLOCK
                  ) -> tuple[tuple[int, ...], tuple[str | None, ...], tuple[int, ...]]:
    """(payload shape, payload logical axes, block per payload dim) of a parameter with this
    shape and these logical axes (without a stacked "layers" axis). Head projections
    [D, N, H] are stored [D, N*H] with `row_block` rows per block; embed / mlp dims are
    blocked by 128; experts and unnamed dims are not blocked."""
    shape, axes = tuple(shape), tuple(axes)
    if len(axes) == 3 and axes[1] in _HEADS and axes[2] == "head_dim":
        return (shape[0], shape[1] * shape[2]), (axes[0], axes[1]), (BLOCK, row_block)
    if any(a in _HEADS or a == "head_dim" for a in axes):
        raise ValueError(f"no FP8 layout for a parameter with axes {axes}")
    return shape, axes, tuple(BLOCK if a in _BLOCKED else 1 for a in axes)


def scale_shape(stored_shape: Sequence[int], blocks: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-d // b) for d, b in zip(stored_shape, blocks, strict=True))


def dequantize(payload: jax.Array, scale: jax.Array, blocks: Sequence[int], dtype) -> jax.Array:
    """payload * (scale repeated over its blocks), in float32, rounded once to `dtype`.
    Leading dims beyond `blocks` (a stacked layers axis) are carried through."""
    lead = payload.ndim - len(blocks)
    s = scale.astype(jnp.float32)
    for i, b in enumerate(blocks):
        if b > 1:
            axis = lead + i
            s = jax.lax.slice_in_dim(jnp.repeat(s, b, axis=axis), 0, payload.shape[axis],
                                     axis=axis)
    return (payload.astype(jnp.float32) * s).astype(dtype)


class FP8Weight(nnx.Module):
    """An FP8 payload with its block scales standing in for one parameter: indexing it
    (`w[...]`) gives the dequantised parameter in `dtype` and the parameter's shape."""

    def __init__(self, payload: FP8Payload, scale_inv: FP8Scale, *, blocks: Sequence[int],
                 shape: Sequence[int], dtype):
        self.payload = payload
        self.scale_inv = scale_inv
        self.blocks = tuple(int(b) for b in blocks)
        self.param_shape = tuple(int(d) for d in shape)  # without a stacked layers axis
        self.dtype = jnp.dtype(dtype).name

    def __getitem__(self, index):
        p = self.payload.get_value()
        w = dequantize(p, self.scale_inv.get_value(), self.blocks, self.dtype)
        lead = p.ndim - len(self.blocks)
        return w.reshape(*p.shape[:lead], *self.param_shape)[index]

    @property
    def nbytes(self) -> int:
        return int(self.payload.get_value().size * E4M3.itemsize
                   + self.scale_inv.get_value().size * 4)


def abstract_fp8_weight(param: nnx.Variable, *, row_block: int = BLOCK,
                        stacked: bool = False) -> FP8Weight:
    """The FP8 stand-in (shapes only, `jax.ShapeDtypeStruct` values) for an abstract
    parameter; `stacked`: the parameter has a leading "layers" axis."""
    axes = tuple(param.get_metadata()["axes"])
    shape = tuple(param.shape)
    lead_shape, lead_axes = (shape[:1], axes[:1]) if stacked else ((), ())
    p_shape, p_axes, blocks = stored_layout(shape[len(lead_shape):], axes[len(lead_axes):],
                                            row_block)
    s_shape = scale_shape(p_shape, blocks)
    # Scales follow the payload only on unblocked dims (experts); blocked ones are tiny and
    # replicated, so a shard never needs a neighbour's scale.
    s_axes = tuple(a if b == 1 else None for a, b in zip(p_axes, blocks, strict=True))
    payload = FP8Payload(jax.ShapeDtypeStruct(lead_shape + p_shape, E4M3),
                         axes=lead_axes + p_axes)
    scale = FP8Scale(jax.ShapeDtypeStruct(lead_shape + s_shape, jnp.float32),
                     axes=lead_axes + s_axes)
    return FP8Weight(payload, scale, blocks=blocks, shape=shape[len(lead_shape):],
                     dtype=param.dtype)


def row_block_of(row_map: np.ndarray) -> int:
    """The largest block (a power of two <= 128) over which a row -> scale-row map is
    constant: 128 for the uniform grid, 64 for the global layers' per-head K/V grid."""
    rows = np.arange(len(row_map))
    for b in (128, 64, 32, 16, 8, 4, 2, 1):
        if np.array_equal(row_map, row_map[rows // b * b]):
            return b
    return 1


def replace_with_fp8(model: nnx.Module, path: tuple, weight: FP8Weight) -> None:
    """Put `weight` where the parameter at flat-state `path` is."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    setattr(parent, path[-1], weight)


def fp8_weights(model: nnx.Module) -> list[tuple[tuple, FP8Weight]]:
    """(path, module) of every FP8 weight of a model."""
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, FP8Weight)]


def gathered_experts_apply(gate_up: FP8Weight, down: FP8Weight, x_td: jax.Array,
                           ids_tk: jax.Array, weights_tk: jax.Array) -> jax.Array | None:
    """SwiGLU experts for a few tokens straight from FP8: dequantise only the experts each
    assignment uses ([T*K] gathered payloads) instead of all E, and apply them per assignment.
    Returns None when this is not the cheaper path (T*K >= E: every expert is read anyway, or
    experts spread over a mesh, where the expert-parallel path applies)."""
    t, d = x_td.shape
    k = ids_tk.shape[1]
    e = gate_up.payload.get_value().shape[0]
    if t * k >= e:
        return None
    ids_m = ids_tk.reshape(-1)
    dt = x_td.dtype
    gu = dequantize(jnp.take(gate_up.payload.get_value(), ids_m, axis=0),
                    jnp.take(gate_up.scale_inv.get_value(), ids_m, axis=0), gate_up.blocks,
                    gate_up.dtype).astype(dt)  # [M, D, F, 2]
    dn = dequantize(jnp.take(down.payload.get_value(), ids_m, axis=0),
                    jnp.take(down.scale_inv.get_value(), ids_m, axis=0), down.blocks,
                    down.dtype).astype(dt)  # [M, F, D]
    x_md = jnp.repeat(x_td, k, axis=0)
    h_mfc = jnp.einsum("md,mdfc->mfc", x_md, gu, preferred_element_type=jnp.float32)
    act_mf = (jax.nn.silu(h_mfc[..., 0]) * h_mfc[..., 1]).astype(dt)
    y_md = jnp.einsum("mf,mfd->md", act_mf, dn, preferred_element_type=jnp.float32)
    y_tkd = y_md.reshape(t, k, d) * weights_tk.astype(jnp.float32)[..., None]
    return jnp.sum(y_tkd, axis=1).astype(dt)
