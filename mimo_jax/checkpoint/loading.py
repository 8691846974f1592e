"""Building models: abstract shapes first, then random init or released weights.

`abstract_model` gives the parameter tree as shapes without allocating anything; loading fills
that same tree, so init, load, conversion and restore share one description of the model.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from flax import nnx

from mimo_jax.checkpoint import fp8_keep, orbax_io
from mimo_jax.checkpoint.convert import fp8_leaf_values
from mimo_jax.checkpoint.hf_mapping import TensorMap, hf_shapes, tensor_maps, to_model
from mimo_jax.checkpoint.release import ReleaseReader, checkpoint_dtype
from mimo_jax.checkpoint.safetensors_io import DTYPES, SafetensorsCheckpoint
from mimo_jax.core.dtypes import DTypeLike, canonical_dtype
from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import MiMo
from mimo_jax.model.shapes import abstract_model
from mimo_jax.parallel.placement import placer
from mimo_jax.sharding.rules import ShardingRules

# Tensors a release may carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_MTP_LAYER = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
FP8_DTYPES = (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"])


def load(
    path: str | os.PathLike,
    *,
    dtype: DTypeLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    keep_fp8: bool = False,
    **config_overrides,
) -> MiMo:
    """A ready model from any of:

    - a Hugging Face / release directory (`config.json` + safetensors, one file or sharded with
      `model.safetensors.index.json`), released names, MTP heads when present; FP8 tensors
      (with `weight_scale_inv`) are dequantised on the fly;
    - an Orbax model directory written by `mimo-jax convert hf-to-orbax`;
    - a training work directory (its latest checkpoint) or one `checkpoints/<step>` directory.

    Args:
      dtype: parameter and compute dtype in any spelling ("bf16", "float32", jnp.bfloat16,
        np.float32); default: the checkpoint's.
      mesh: place every parameter directly in its shards on this mesh (see
        `mimo_jax.sharding`); the host holds at most one parameter at a time.
      rules: sharding rules for `mesh` (default: `ShardingRules.preset()`).
      keep_fp8: keep the FP8 weights (a release directory, or an Orbax directory converted
        with `--keep-fp8`) as E4M3 payloads plus their block scales on device, dequantised
        inside the matmuls (`mimo_jax.model.fp8_linear`): half the memory of bfloat16.
      config_overrides: ModelConfig fields to change (for example `sliding_window_keys`-style
        semantics are set through `sliding_attention`).
    """
    dtype = None if dtype is None else canonical_dtype(dtype)
    placement = None if mesh is None else (mesh, rules or ShardingRules.preset())
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if orbax_io.is_model_dir(path):
        return restore_model_dir(path, dtype=dtype, placement=placement, keep_fp8=keep_fp8,
                                 **config_overrides)
    step = orbax_io.training_step_dir(path)
    if step is not None:
        if keep_fp8:
            raise CheckpointError(f"{path}: keep_fp8 needs FP8 weights; a training checkpoint "
                                  "has none")
        hf = orbax_io.step_config(step)
        dtype = dtype or str(hf.get("torch_dtype") or "float32")
        cfg = ModelConfig.from_hf(hf, **config_overrides).replace(dtype=dtype, param_dtype=dtype)
        return orbax_io.restore_params(os.path.join(step, "params"), cfg, placement=placement)
    ckpt = SafetensorsCheckpoint(path)
    fp8 = [n for n in ckpt if ckpt.dtype(n) in FP8_DTYPES and n + "_scale_inv" in ckpt]
    if fp8:
        reader = ReleaseReader(path, **config_overrides)
        reader.validate()
        cfg = reader.cfg.replace(dtype=dtype or "bfloat16", param_dtype=dtype or "bfloat16")
        names = {n for n in ckpt if not (n.endswith("_scale_inv") and n[:-10] in fp8)}
        return load_from_tensors(cfg, reader.read, names, source=path, placement=placement,
                                 fp8_source=fp8_keep.ReleaseSource(reader) if keep_fp8 else None)
    if keep_fp8:
        raise CheckpointError(f"{path}: keep_fp8 given but the checkpoint has no FP8 tensors "
                              "(E4M3 with a weight_scale_inv)")
    mtp_layers = {int(m.group(1)) for n in ckpt if (m := _MTP_LAYER.match(n))}
    if mtp_layers and mtp_layers != set(range(len(mtp_layers))):
        raise CheckpointError(f"{path}: MTP layers {sorted(mtp_layers)} are not 0..n-1")
    if dtype is None:
        dtype = checkpoint_dtype(path)
    cfg = ModelConfig.from_hf(path, **config_overrides).replace(
        num_mtp_layers=len(mtp_layers), dtype=dtype, param_dtype=dtype
    )
    return load_from_tensors(cfg, ckpt.get, set(ckpt), source=path, placement=placement)


def load_from_tensors(cfg: ModelConfig, get, names: set[str], *, source: str,
                      placement: tuple[jax.sharding.Mesh, ShardingRules] | None = None,
                      fp8_source: fp8_keep.ReleaseSource | None = None) -> MiMo:
    """Fill the abstract model from released tensors given by `get(name) -> np.ndarray`.

    `placement` (mesh, rules): put each parameter straight into its shards on the mesh.
    `fp8_source`: keep the parameters whose tensors it holds in FP8 as FP8 weights.
    """
    model = abstract_model(cfg)
    maps = tensor_maps(cfg)
    known = {n for m in maps for n in m.hf_names}
    unknown = sorted(n for n in names - known if not _IGNORED.match(n))
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensors do not belong to a model with this config, "
            f"e.g. {unknown[:3]}"
        )
    missing = sorted(known - names)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing, e.g. {missing[:3]}")

    by_path: dict[tuple, list[TensorMap]] = {}
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    kept = {} if fp8_source is None else fp8_keep.install(model, by_path, fp8_source)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    place = placer(state, placement)
    fp8_keep.fill(flat, by_path, kept, fp8_source, place)
    for p, group in by_path.items():
        if p in kept:
            continue
        var = flat[p]
        stacked = group[0].block is not None
        shape = var.shape[1:] if stacked else var.shape
        out = np.empty(var.shape, var.dtype)
        for m in group:
            tensors = [get(n) for n in m.hf_names]
            for name, t, want in zip(m.hf_names, tensors, hf_shapes(m.kind, shape), strict=True):
                if t.shape != want:
                    raise CheckpointError(
                        f"{source}: tensor {name!r} has shape {t.shape}, the config expects {want}"
                    )
            value = to_model(m.kind, [np.asarray(t, np.float32) for t in tensors], shape)
            if stacked:
                out[m.block] = value
            else:
                out[...] = value
        var.set_value(place(p, out))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def restore_model_dir(path: str, *, dtype: str | None = None, placement=None,
                      keep_fp8: bool = False, **config_overrides):
    """A `MiMo` from an Orbax model directory (FP8 leaves dequantised, or kept as FP8)."""
    info = orbax_io.model_dir_info(path)
    dtype = canonical_dtype(dtype or info["dtype"])
    cfg = ModelConfig.from_hf(os.path.join(path, "config.json"), **config_overrides).replace(
        dtype=dtype, param_dtype=dtype)
    params_dir, fp8_dir = os.path.join(path, "params"), os.path.join(path, "fp8")
    if not keep_fp8:
        extra = fp8_leaf_values(fp8_dir, cfg) if info.get("fp8") else None
        return orbax_io.restore_params(params_dir, cfg, extra, placement=placement)
    if not info.get("fp8"):
        raise CheckpointError(f"{path}: keep_fp8 needs FP8 weights; this directory holds none "
                              "(convert with `mimo-jax convert hf-to-orbax --keep-fp8`)")
    source = fp8_keep.OrbaxSource(fp8_dir, cfg)
    model = abstract_model(cfg)
    groups: dict[tuple, list[TensorMap]] = {}
    for m in tensor_maps(cfg):
        groups.setdefault(m.path, []).append(m)
    kept = fp8_keep.install(model, groups, source)
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    place = placer(state, placement)
    extra: dict[tuple, object] = {}
    fp8_keep.fill(flat, groups, kept, source,
                  lambda p, value: extra.setdefault(p, place(p, value)))
    for p, group in groups.items():  # stored as FP8 but not keepable: dequantised here
        if p not in kept and all(source.is_fp8(n) for m in group for n in m.hf_names):
            var = flat[p]
            extra[p] = fp8_keep.dequantized(group, tuple(var.shape), var.dtype, source)
    return orbax_io.restore_params(params_dir, cfg, extra, placement=placement, abstract=model)
