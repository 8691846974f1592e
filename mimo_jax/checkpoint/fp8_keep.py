"""Keeping the release's FP8 weights as FP8 on device (`load(..., keep_fp8=True)`).

Released E4M3 tensors and their `weight_scale_inv` blocks become `FP8Weight`s in the model's
layout (see mimo_jax/model/fp8_linear.py): the payload transposed/stacked like the parameter,
the scales on the same grid, with the global layers' per-head K/V grid re-expressed exactly on
64-row blocks. Sources: a release directory (`ReleaseSource`) or the `fp8/` item of an Orbax
directory written with `--keep-fp8` (`OrbaxSource`), or a model's own weights quantised here
(`MemorySource`, `quantize_model`); each gives, per released name, the payload, its scale rows
and the map from weight row to scale row.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from mimo_jax.checkpoint import fp8
from mimo_jax.checkpoint.hf_mapping import Path, TensorMap, tensor_maps, to_hf, to_model
from mimo_jax.checkpoint.orbax_io import LeafReader
from mimo_jax.checkpoint.release import ReleaseReader
from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.fp8_linear import BLOCK, abstract_fp8_weight, replace_with_fp8, row_block_of
from mimo_jax.parallel.placement import placer

# Released layouts an FP8Weight can hold: head projections, [in, out] linears, experts.
KEEPABLE = ("heads_in", "linear", "experts_gate_up", "experts_down")
_BLOCKED = {"embed", "mlp", "expert_mlp"}


class ReleaseSource:
    """FP8 tensors of a release directory, by released name."""

    def __init__(self, reader: ReleaseReader):
        self.reader = reader

    def is_fp8(self, name: str) -> bool:
        return self.reader.is_fp8(name)

    def row_map(self, name: str) -> np.ndarray:
        """Weight row -> scale row (into [K's scale; V's scale] for a per-head V)."""
        return self.reader.row_map(name)[0]

    def tensor(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(E4M3 payload [rows, cols], scale rows, row -> scale-row map)."""
        payload, scale = self.reader.read_fp8(name)
        row_map, k_scale = self.reader.row_map(name)
        if k_scale is not None:  # per-head V: its first rows use K's scale rows
            scale = np.concatenate([k_scale, scale])
        return payload, scale, row_map


class OrbaxSource:
    """FP8 tensors of an Orbax `fp8/` item (payload [*layers, n, rows, cols] per parameter)."""

    def __init__(self, fp8_dir: str, cfg: ModelConfig):
        self.leaves = LeafReader(fp8_dir)
        self.cfg = cfg
        self.where: dict[str, tuple[tuple, tuple]] = {}
        for m in tensor_maps(cfg):
            key = tuple(str(k) for k in m.path)
            if key + ("payload",) in self.leaves:
                lead = () if m.block is None else (m.block,)
                for j, name in enumerate(m.hf_names):
                    self.where[name] = (key, (*lead, j))

    def is_fp8(self, name: str) -> bool:
        return name in self.where

    def row_map(self, name: str) -> np.ndarray:
        key, index = self.where[name]
        grid = self._head_grid(key, index)
        if grid is None:
            return fp8.uniform_rows(self.leaves.store(key + ("payload",)).shape[-2])
        (k_rows, v_rows), _ = grid
        return k_rows if key[-1] == "k_proj" else v_rows

    def tensor(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key, index = self.where[name]
        payload = self.leaves.read(key + ("payload",), index)
        scale = self.leaves.read(key + ("scale_inv",), index)
        row_map = fp8.uniform_rows(payload.shape[0])
        grid = self._head_grid(key, index)
        if grid is not None:
            (k_rows, v_rows), k_scale = grid
            if key[-1] == "k_proj":
                row_map = k_rows
            else:
                row_map, scale = v_rows, np.concatenate([k_scale, scale])
        return payload, scale, row_map

    def _head_grid(self, key: tuple, index: tuple):
        if key[-1] not in ("k_proj", "v_proj"):
            return None
        k_key, v_key = key[:-1] + ("k_proj",), key[:-1] + ("v_proj",)
        if k_key + ("payload",) not in self.leaves or v_key + ("payload",) not in self.leaves:
            return None
        n_dk = self.leaves.store(k_key + ("payload",)).shape[-2]
        n_dv = self.leaves.store(v_key + ("payload",)).shape[-2]
        k_scale = self.leaves.read(k_key + ("scale_inv",), index)
        for spec in (self.cfg.full_attention, self.cfg.sliding_attention):
            n = spec.num_kv_heads
            if n * spec.head_dim == n_dk and fp8.is_head_grid(k_scale.shape[0], n, n_dk // n):
                return fp8.head_grid_rows(n, n_dk // n, n_dv // n), k_scale
        return None


class MemorySource:
    """A model's own weights quantised as the release does (uniform 128x128 blocks, the
    per-head fused K/V grid on global layers), served by released name."""

    def __init__(self, model: nnx.Module, quantised: set[str]):
        cfg = model.cfg
        flat = dict(nnx.to_flat_state(nnx.state(model)))
        self.tensors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        hf: dict[str, np.ndarray] = {}
        for m in tensor_maps(cfg):
            if m.path[-1] not in quantised:
                continue
            value = np.asarray(flat[m.path].get_value(), np.float32)
            value = value[m.block] if m.block is not None else value
            hf.update(zip(m.hf_names, to_hf(m.kind, value), strict=True))
        for name, w in hf.items():
            kv = _KV_FULL.match(name)
            if kv and cfg.layer_types[int(kv.group(1))] == "full":
                if name.endswith("k_proj.weight"):
                    self._full_kv(name, hf, cfg.full_attention)
                continue
            q, scale = fp8.quantize(w)
            self.tensors[name] = (q, scale, fp8.uniform_rows(w.shape[0]))

    def _full_kv(self, k_name: str, hf: dict, spec) -> None:
        v_name = k_name.replace("k_proj", "v_proj")
        n = spec.num_kv_heads
        kq, ks, vq, vs = fp8.quantize_kv(hf[k_name], hf[v_name], n)
        k_rows, v_rows = fp8.head_grid_rows(n, spec.head_dim, spec.v_head_dim)
        self.tensors[k_name] = (kq, ks, k_rows)
        self.tensors[v_name] = (vq, np.concatenate([ks, vs]), v_rows)

    def is_fp8(self, name: str) -> bool:
        return name in self.tensors

    def row_map(self, name: str) -> np.ndarray:
        return self.tensors[name][2]

    def tensor(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.tensors[name]


Source = ReleaseSource | OrbaxSource | MemorySource

# What the release quantises (checkpoint.md §2): q/k/v, dense MLPs, experts (MTP heads too).
RELEASE_FP8 = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "gate_up",
               "down"}
_KV_FULL = re.compile(r"^model\.layers\.(\d+)\.self_attn\.[kv]_proj\.weight$")


def quantize_model(model: nnx.Module, placement=None) -> nnx.Module:
    """A copy of `model` with the release's FP8 parameters quantised as the release does
    (E4M3, float32 128x128 block scales, the per-head K/V grid on global layers) and kept as
    FP8 weights. For serving a model trained here in FP8, and for tests and benchmarks of the
    FP8 path without a release checkpoint. `placement` (mesh, rules): where the FP8 weights
    go (default: the default device)."""
    cfg = model.cfg
    source = MemorySource(model, RELEASE_FP8)
    groups: dict[Path, list[TensorMap]] = {}
    for m in tensor_maps(cfg):
        groups.setdefault(m.path, []).append(m)
    target = nnx.clone(model)
    kept = install(target, groups, source)
    state = nnx.state(target)
    fill(dict(nnx.to_flat_state(state)), groups, kept, source, placer(state, placement))
    return target


def _keepable(group: list[TensorMap], var: nnx.Variable) -> bool:
    kind = group[0].kind
    axes = tuple(var.get_metadata()["axes"])[1 if group[0].block is not None else 0:]
    if kind == "linear":
        return set(axes) <= _BLOCKED
    return kind in KEEPABLE


def install(model: nnx.Module, groups: dict[Path, list[TensorMap]], source: Source
            ) -> dict[Path, int]:
    """Swap every parameter whose released tensors are all FP8 (and whose layout an FP8Weight
    can hold) for an abstract FP8Weight; returns {path: row block}."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    kept = {}
    for path, group in groups.items():
        names = [n for m in group for n in m.hf_names]
        if not names or not all(source.is_fp8(n) for n in names):
            continue
        if not _keepable(group, flat[path]):
            continue
        row_block = BLOCK
        if group[0].kind == "heads_in":  # the only layout whose rows may be on a finer grid
            row_block = min(row_block_of(source.row_map(n)) for n in names)
        stacked = group[0].block is not None
        replace_with_fp8(model, path, abstract_fp8_weight(flat[path], row_block=row_block,
                                                          stacked=stacked))
        kept[path] = row_block
    return kept


def _gridded(payload: np.ndarray, scale: np.ndarray, row_map: np.ndarray, row_block: int,
             name: str) -> np.ndarray:
    """Scale rows on a uniform grid of `row_block` rows (exact: the map is constant there)."""
    rows = row_map[::row_block]
    if not np.array_equal(row_map, rows[np.arange(len(row_map)) // row_block]):
        raise CheckpointError(f"{name}: its scale grid is not uniform over {row_block} rows")
    if scale.shape[1] != -(-payload.shape[1] // BLOCK):
        raise CheckpointError(f"{name}: scale {scale.shape} does not fit weight {payload.shape}")
    return scale[rows]


def values(group: list[TensorMap], payload_shape: tuple[int, ...], scale_shape: tuple[int, ...],
           row_block: int, source: Source) -> tuple[np.ndarray, np.ndarray]:
    """The stored payload and scale (stacked over layers when scanned) of one parameter."""
    payload_out = np.empty(payload_shape, fp8.E4M3)
    scale_out = np.empty(scale_shape, np.float32)
    stacked = group[0].block is not None
    for m in group:
        lead = (m.block,) if stacked else ()
        pays, scales = [], []
        for n in m.hf_names:
            payload, scale, row_map = source.tensor(n)
            pays.append(payload)
            scales.append(_gridded(payload, scale, row_map, row_block, n))
        p_shape, s_shape = payload_shape[len(lead):], scale_shape[len(lead):]
        if m.kind in ("heads_in", "linear"):  # released [out, in] -> stored [in, out]
            p, s = pays[0].T, scales[0].T
        else:  # experts: stacked on the expert axis exactly as the parameter is
            p, s = to_model(m.kind, pays, p_shape), to_model(m.kind, scales, s_shape)
        if p.shape != p_shape or s.shape != s_shape:
            raise CheckpointError(f"{m.hf_names[0]}: FP8 payload {p.shape} / scale {s.shape} do "
                                  f"not fit the model's {p_shape} / {s_shape}")
        payload_out[lead] = p
        scale_out[lead] = s
    return payload_out, scale_out


def fill(flat: dict, groups: dict[Path, list[TensorMap]], kept: dict[Path, int], source: Source,
         place: Callable[[Path, np.ndarray], jax.Array]) -> None:
    """Read, lay out and place every kept FP8 weight, one parameter at a time."""
    for path, row_block in kept.items():
        pvar, svar = flat[path + ("payload",)], flat[path + ("scale_inv",)]
        payload, scale = values(groups[path], tuple(pvar.shape), tuple(svar.shape), row_block,
                                source)
        pvar.set_value(place(path + ("payload",), payload))
        svar.set_value(place(path + ("scale_inv",), scale))


def dequantized(group: list[TensorMap], shape: tuple[int, ...], dtype, source: Source
                ) -> np.ndarray:
    """A parameter whose FP8 tensors are not kept as FP8, dequantised on the host."""
    out = np.empty(shape, dtype)
    for m in group:
        lead = (m.block,) if m.block is not None else ()
        deq = [fp8.dequantize(*source.tensor(n)) for n in m.hf_names]
        out[lead] = to_model(m.kind, deq, shape[len(lead):])
    return out


__all__ = ["MemorySource", "OrbaxSource", "ReleaseSource", "dequantized", "fill", "install",
           "quantize_model", "values"]
