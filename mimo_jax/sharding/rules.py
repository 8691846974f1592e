"""Sharding as data: logical axis names -> mesh axes, in one table per preset.

Every parameter carries logical `axes` metadata (see `mimo_jax.model.layers.param`); activations are
constrained with logical names too (`constrain`). `ShardingRules` turns those names into
`PartitionSpec`s for a mesh with axes ("data", "fsdp", "context", "expert", "tensor"), and
refuses a rule set that would map two dimensions of one tensor onto the same mesh axis.

The `context` axis splits activations' sequence dimension (context parallelism, see
`mimo_jax.model.context_parallel`); no parameter is ever split over it, so weights are
replicated across it (or FSDP'd over `fsdp` as usual). A mesh without it has context=1.

    mesh = make_mesh("data=1,fsdp=-1,expert=4,tensor=1")
    rules = ShardingRules.preset("fsdp_expert")
    model = mimo_jax.parallel.create_sharded(cfg, mesh, rules)  # never a full copy
    with activate(mesh, rules):                          # activations + expert parallelism
        logits = nnx.jit(lambda m, x: m(x).logits)(model, ids)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")
MeshAxes = tuple[str, ...]

# The full table (FSDP + tensor + expert parallelism). Other presets drop mesh axes from it.
_FULL: dict[str, MeshAxes] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "embed_concat": ("tensor",),  # MTP eh_proj input [2D]
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
    "norm": (),
    "layers": (),
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": ("context",),  # context parallelism: never a parameter axis
    "act_embed": (),
    "act_vocab": ("tensor",),
}


# Logical axes that name parameter dimensions (the rest name activation dimensions).
_PARAM_AXES = frozenset({"vocab", "embed", "embed_concat", "q_heads", "kv_heads", "head_dim",
                         "mlp", "experts", "expert_mlp", "norm", "layers"})


class ShardingError(ValueError):
    """A mesh or rule set that cannot shard the model as asked."""


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of a mesh axis; 1 for an axis the mesh lacks (a mesh built by hand before the
    `context` axis existed)."""
    return dict(mesh.shape).get(axis, 1)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    rules: tuple[tuple[str, MeshAxes], ...]

    @classmethod
    def preset(cls, name: str = "fsdp_tensor_expert", **overrides: str | Sequence[str] | None
               ) -> ShardingRules:
        """`fsdp` (weights over fsdp), `fsdp_expert` (+ experts over expert),
        `fsdp_tensor_expert` (+ heads, MLP and vocab over tensor). Overrides map a logical
        name to a mesh axis, a sequence of them, or None (replicated)."""
        dropped = {"fsdp": {"tensor", "expert"}, "fsdp_expert": {"tensor"},
                   "fsdp_tensor_expert": set()}
        if name not in dropped:
            raise ShardingError(f"unknown sharding preset {name!r}; have {sorted(dropped)}")
        table = {k: tuple(a for a in v if a not in dropped[name]) for k, v in _FULL.items()}
        if name == "fsdp":  # tokens still split over every mesh axis that is not idle
            table["batch"] = ("data", "fsdp", "expert")
        for key, value in overrides.items():
            axes = () if value is None else (value,) if isinstance(value, str) else tuple(value)
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown:
                raise ShardingError(f"rule {key!r}: unknown mesh axes {unknown}; have {MESH_AXES}")
            table[key] = axes
        for key, axes in table.items():
            if "context" in axes and key in _PARAM_AXES:
                raise ShardingError(f"rule {key!r}: parameters never shard over the 'context' "
                                    "axis (it splits the sequence only)")
        return cls(tuple(sorted(table.items())))

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return ()
        table = dict(self.rules)
        if logical not in table:
            raise ShardingError(f"no sharding rule for logical axis {logical!r}")
        return table[logical]

    def spec(self, logical_axes: Sequence[str | None], *, where: str = "a tensor") -> PartitionSpec:
        """PartitionSpec for a tensor with these logical axes; two dims on one mesh axis fail."""
        used: dict[str, str | None] = {}
        out = []
        for name in logical_axes:
            axes = self.mesh_axes(name)
            for a in axes:
                if a in used:
                    raise ShardingError(
                        f"{where}: logical axes {used[a]!r} and {name!r} both map to mesh axis "
                        f"{a!r} (axes {tuple(logical_axes)})"
                    )
                used[a] = name
            out.append(axes[0] if len(axes) == 1 else (axes or None))
        return PartitionSpec(*out)


def axes_of(var: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(var.get_metadata().get("axes") or (None,) * len(var.shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
    """NamedShardings for a model state (abstract or real), after checking divisibility."""

    def one(path, var):
        where = "/".join(map(str, path))
        spec = rules.spec(axes_of(var), where=where)
        for dim, (size, axes) in enumerate(zip(var.shape, spec, strict=True)):
            names = () if axes is None else (axes,) if isinstance(axes, str) else axes
            ways = math.prod(mesh.shape[a] for a in names)
            if size % ways:
                raise ShardingError(
                    f"{where}: dimension {dim} ({axes_of(var)[dim]}) of size {size} cannot be "
                    f"split {ways} ways over mesh axes {names}"
                )
        return var.replace(NamedSharding(mesh, spec))

    flat = [(p, one(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def replicated_fraction(state: nnx.State, rules: ShardingRules, mesh: Mesh) -> float:
    """Fraction of parameter bytes that no mesh axis splits."""
    total = replicated = 0
    for path, var in nnx.to_flat_state(state):
        nbytes = int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
        total += nbytes
        spec = rules.spec(axes_of(var), where="/".join(map(str, path)))
        ways = math.prod(mesh.shape[a] for s in spec if s for a in ((s,) if isinstance(s, str)
                                                                       else s))
        replicated += nbytes if ways == 1 else 0
    return replicated / max(total, 1)


# --------------------------------------------------------------------------- activations
_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "mimo_jax_sharding", default=None
)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: ShardingRules) -> Iterator[None]:
    """Within this block, traced model code constrains activations and runs the MoE expert
    parallel over `mesh`. (Functions jitted earlier keep the trace they already have.)"""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, ShardingRules] | None:
    return _ACTIVE.get()


def activation_sharding(mesh: Mesh, rules: ShardingRules, shape: Sequence[int],
                        logical_axes: Sequence[str | None]) -> NamedSharding:
    """Sharding of an activation (or input batch). Mesh axes that do not divide a dimension
    (a batch of 1 while generating) are left out rather than failing."""
    spec = []
    for size, name in zip(shape, logical_axes, strict=True):
        axes = tuple(a for a in rules.mesh_axes(name) if axis_size(mesh, a) > 1)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        spec.append(axes or None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding when a mesh is active; a no-op otherwise."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, activation_sharding(*ctx, x.shape, logical_axes))
