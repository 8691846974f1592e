"""Reading a released (Hugging Face layout) checkpoint tensor by tensor, FP8 included.

A tensor is FP8 when its dtype is F8_E4M3/F8_E5M2 *and* it has a `<name>_scale_inv` sibling;
nothing is decided from a list of names. `validate` checks the whole checkpoint against the
config before anything is converted, so errors surface first and name the tensor and file.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
from flax import nnx

from mimo_jax.checkpoint import fp8
from mimo_jax.checkpoint.hf_mapping import TensorMap, hf_shapes, tensor_maps
from mimo_jax.checkpoint.safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsCheckpoint
from mimo_jax.core.dtypes import canonical_dtype
from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import ModelConfig, read_json_config
from mimo_jax.model.shapes import abstract_model

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
MTP_LAYER = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
FP8_DTYPES = (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"])
FLOAT_DTYPES = (DTYPES["F32"], DTYPES["BF16"], DTYPES["F16"])
SCALE_SUFFIX = "_scale_inv"
_KV = re.compile(r"^(.*self_attn\.)([kv])_proj\.weight$")


def model_shapes(cfg: ModelConfig) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
    """Flat state path -> (shape, dtype) of every variable of the model, nothing allocated."""
    state = nnx.state(abstract_model(cfg))
    return {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(state)}


class ReleaseReader:
    """A release directory: its config, its tensors, FP8 detection and dequantisation."""

    def __init__(self, path: str | os.PathLike, **config_overrides):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is not a checkpoint directory")
        self.ckpt = SafetensorsCheckpoint(self.path)
        mtp = {int(m.group(1)) for n in self.ckpt if (m := MTP_LAYER.match(n))}
        if mtp and mtp != set(range(len(mtp))):
            raise CheckpointError(f"{self.path}: MTP layers {sorted(mtp)} are not 0..n-1")
        self.cfg = ModelConfig.from_hf(self.path, **config_overrides).replace(
            num_mtp_layers=len(mtp))
        self.maps: list[TensorMap] = tensor_maps(self.cfg)
        self.shapes = model_shapes(self.cfg)
        self._map_of = {n: m for m in self.maps for n in m.hf_names}

    # ------------------------------------------------------------------ per tensor facts
    def file(self, name: str) -> str:
        return os.path.join(self.path, self.ckpt.weight_map.get(name, "?"))

    def is_fp8(self, name: str) -> bool:
        return self.ckpt.dtype(name) in FP8_DTYPES and name + SCALE_SUFFIX in self.ckpt

    def nbytes(self, name: str) -> int:
        return self.ckpt.file_of(name).nbytes(name)

    def offset(self, name: str) -> tuple[str, int]:
        f = self.ckpt.file_of(name)
        return f.path, f._entries[name]["data_offsets"][0]

    def param_shape(self, m: TensorMap) -> tuple[int, ...]:
        shape = self.shapes[m.path][0]
        return shape[1:] if m.block is not None else shape

    def expected_shape(self, name: str) -> tuple[int, ...]:
        m = self._map_of[name]
        return hf_shapes(m.kind, self.param_shape(m))[m.hf_names.index(name)]

    def _kv(self, name: str) -> tuple[int, int, int, str, str] | None:
        """(KV heads, K dim, V dim, k name, v name) for a K/V projection, else None."""
        match = _KV.match(name)
        if not match:
            return None
        k_name = f"{match.group(1)}k_proj.weight"
        v_name = f"{match.group(1)}v_proj.weight"
        _, n, dk = self.param_shape(self._map_of[k_name])
        dv = self.param_shape(self._map_of[v_name])[2]
        return n, dk, dv, k_name, v_name

    def head_grid(self, name: str) -> bool:
        """Whether this K/V projection uses the per-head fused grid (decided by K's scale)."""
        kv = self._kv(name)
        if kv is None or not self.is_fp8(kv[3]):
            return False
        n, dk, _, k_name, _ = kv
        return fp8.is_head_grid(self.ckpt.shape(k_name + SCALE_SUFFIX)[0], n, dk)

    def expected_scale_shape(self, name: str) -> tuple[int, int]:
        rows, cols = self.ckpt.shape(name)
        if self.head_grid(name):
            n, dk, dv, k_name, _ = self._kv(name)
            kb, vb = fp8.head_grid(n, dk, dv)
            return (n * (kb if name == k_name else vb), math.ceil(cols / fp8.BLOCK))
        return fp8.scale_shape(rows, cols)

    # ------------------------------------------------------------------ reading
    def read_fp8(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(payload, float32 scale_inv) exactly as stored."""
        return (self.ckpt.file_of(name).read(name),
                self.ckpt.file_of(name + SCALE_SUFFIX).read(name + SCALE_SUFFIX))

    def row_map(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(row -> scale-row map, extra scale rows to append: K's scale for a per-head V)."""
        rows = self.ckpt.shape(name)[0]
        if not self.head_grid(name):
            return fp8.uniform_rows(rows), None
        n, dk, dv, k_name, _ = self._kv(name)
        k_rows, v_rows = fp8.head_grid_rows(n, dk, dv)
        if name == k_name:
            return k_rows, None
        return v_rows, self.ckpt.file_of(k_name + SCALE_SUFFIX).read(k_name + SCALE_SUFFIX)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor: dequantised to float32 if FP8, else as stored."""
        f = self.ckpt.file_of(name)
        if not self.is_fp8(name):
            return f.read(name, rows)
        payload, scale = self.read_fp8(name)
        row_map, k_scale = self.row_map(name)
        if k_scale is not None:  # per-head V: row indices point into [k_scale; v_scale]
            scale = np.concatenate([k_scale, scale])
        out = fp8.dequantize(payload, scale, row_map)
        return out if rows is None else out[rows[0] : rows[1]]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Every problem of the checkpoint against its config, as one CheckpointError."""
        problems: list[str] = []
        known = set(self._map_of)
        for name in sorted(self.ckpt):
            try:
                self.ckpt.file_of(name)  # opens the shard: header, truncation
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if name in known or IGNORED.match(name):
                continue
            base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else None
            if base is not None and base in known and base in self.ckpt:
                continue  # a scale; checked with its weight
            problems.append(f"{self.file(name)}: tensor {name!r} does not belong to a model with "
                            "this config (unknown name)")
        for name in sorted(known - set(self.ckpt)):
            problems.append(f"{self.path}: tensor {name!r} is missing (listed in no shard)")
        if problems:
            raise _error(problems)
        for name in sorted(known):
            problems += self._check_tensor(name)
        if problems:
            raise _error(problems)

    def _check_tensor(self, name: str) -> list[str]:
        where = f"{self.file(name)}: tensor {name!r}"
        dtype, shape, want = self.ckpt.dtype(name), self.ckpt.shape(name), self.expected_shape(name)
        if shape != want:
            return [f"{where} has shape {list(shape)}, the config expects {list(want)}"]
        if dtype in FP8_DTYPES:
            scale = name + SCALE_SUFFIX
            if scale not in self.ckpt:
                return [f"{where} is {DTYPE_NAMES[dtype]} but has no {scale!r} scale"]
            s_where = f"{self.file(scale)}: tensor {scale!r}"
            if self.ckpt.dtype(scale) != DTYPES["F32"]:
                return [f"{s_where} has dtype {DTYPE_NAMES[self.ckpt.dtype(scale)]}, want F32"]
            s_want = self.expected_scale_shape(name)
            if self.ckpt.shape(scale) != s_want:
                return [f"{s_where} has shape {list(self.ckpt.shape(scale))}, the weight "
                        f"{list(shape)} needs {list(s_want)}"]
            return []
        if dtype not in FLOAT_DTYPES:
            return [f"{where} has dtype {DTYPE_NAMES[dtype]}; allowed: F32, BF16, F16, or "
                    "F8_E4M3 with a weight_scale_inv"]
        return []


def _error(problems: list[str]) -> CheckpointError:
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    return CheckpointError(f"{len(problems)} problem(s) in the checkpoint:\n  "
                           + "\n  ".join(problems[:8]) + more)


def checkpoint_dtype(path: str) -> str:
    """The float dtype a HF/release directory's config declares (bfloat16 if none/float8)."""
    hf = read_json_config(path)
    dt = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
    try:
        return canonical_dtype(dt)
    except ValueError:  # e.g. a float8 torch_dtype: compute in bfloat16
        return "bfloat16"
