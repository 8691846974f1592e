"""Device meshes over the mesh axes of `mimo_jax.sharding.rules` (one host or many slices)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from mimo_jax.sharding.rules import MESH_AXES, ShardingError


def mesh_shape(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes from "data=1,fsdp=-1,context=1,expert=4,tensor=1" for `num_devices` devices.

    One axis may be -1 (the rest); omitted axes have size 1 (so specs written before the
    `context` axis existed mean context=1).
    """
    if isinstance(spec, str):
        try:
            sizes = {k.strip(): int(v) for k, v in (p.split("=") for p in spec.split(",") if p)}
        except ValueError:
            raise ShardingError(f"bad mesh spec {spec!r}: want 'data=1,fsdp=-1,...'") from None
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; have {MESH_AXES}")
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ShardingError("at most one mesh axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known < 1 or num_devices % known:
            raise ShardingError(f"{num_devices} devices cannot be split as {spec!r}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices or min(shape) < 1:
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs "
                            f"{math.prod(shape)} devices; there are {num_devices}")
    return dict(zip(MESH_AXES, shape, strict=True))


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices of all hosts from "data=1,fsdp=-1,expert=4,tensor=1".

    With several TPU slices the data axis spans slices (DCN), the others stay in a slice (ICI).
    `context` sits between `fsdp` and `expert`: its ring of neighbour permutes stays on ICI.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape(spec, len(devices)).values())
    auto = (AxisType.Auto,) * len(MESH_AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        from jax.experimental import mesh_utils

        n = len(slices)
        if shape[0] % n:
            raise ShardingError(f"data={shape[0]} must be a multiple of the {n} slices")
        dcn = [n] + [1] * (len(MESH_AXES) - 1)
        ici = [shape[0] // n, *shape[1:]]
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
