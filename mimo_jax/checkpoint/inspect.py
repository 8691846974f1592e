"""A summary of a checkpoint directory (release/HF safetensors or Orbax): config, tensors by
group and dtype, FP8 coverage, MTP layers, and inconsistencies."""

from __future__ import annotations

import os
import re
from collections import defaultdict

import numpy as np

from mimo_jax.checkpoint.orbax_io import (
    LeafReader,
    is_model_dir,
    model_dir_info,
    step_config,
    training_step_dir,
)
from mimo_jax.checkpoint.safetensors_io import DTYPE_NAMES
from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import ModelConfig

_GROUPS = [("mtp", re.compile(r"^model\.mtp\.|^mtp\.")),
           ("experts", re.compile(r"experts\.|\.(gate_up|down)$")),
           ("attention", re.compile(r"self_attn\.|\.attn\.")),
           ("dense mlp", re.compile(r"mlp\.(gate|up|down)_proj|\.mlp\.(gate|up|down)_proj")),
           ("router", re.compile(r"mlp\.gate\.|router|correction_bias")),
           ("embeddings/head", re.compile(r"embed|lm_head")),
           ("norms", re.compile(r"norm"))]


def _group(name: str) -> str:
    return next((g for g, rx in _GROUPS if rx.search(name)), "other")


def inspect(path: str) -> str:
    """The report as text."""
    path = os.fspath(path)
    lines: list[str] = []
    stats: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    problems: list[str] = []
    if is_model_dir(path) or training_step_dir(path) is not None:
        if is_model_dir(path):
            info = model_dir_info(path)
            cfg = ModelConfig.from_hf(os.path.join(path, "config.json"))
            items = ["params"] + (["fp8"] if info.get("fp8") else [])
            root = path
            lines.append(f"format: Orbax model directory (dtype {info['dtype']}, "
                         f"fp8 kept: {info.get('fp8')})")
        else:
            root = training_step_dir(path)
            cfg = ModelConfig.from_hf(step_config(root))
            items = ["params"]
            lines.append(f"format: training checkpoint step {root}")
        fp8_params = 0
        for item in items:
            reader = LeafReader(os.path.join(root, item))
            for key in reader.leaves:
                store = reader.store(key)
                n = int(np.prod(store.shape))
                dt = np.dtype(store.dtype.numpy_dtype)
                s = stats[(_group(".".join(key)), DTYPE_NAMES.get(dt, str(dt)))]
                s[0] += 1
                s[1] += n * dt.itemsize
                fp8_params += n if item == "fp8" and key[-1] == "payload" else 0
        from mimo_jax.model.shapes import param_count

        total = param_count(cfg).total_with_mtp
        mtp = sorted({int(k[1]) for item in items
                      for k in LeafReader(os.path.join(root, item)).leaves if k[0] == "mtp"})
        fp8_line = f"{fp8_params / max(total, 1):.1%} of parameters stored as FP8"
    else:
        from mimo_jax.checkpoint.release import FP8_DTYPES, MTP_LAYER, ReleaseReader

        reader = ReleaseReader(path)
        cfg = reader.cfg
        lines.append(f"format: safetensors ({len(set(reader.ckpt.weight_map.values()))} files)")
        fp8_n = total_n = 0
        for name in reader.ckpt:
            f = reader.ckpt.file_of(name)
            dt = f.dtype(name)
            s = stats[(_group(name), DTYPE_NAMES[dt])]
            s[0] += 1
            s[1] += f.nbytes(name)
            if not name.endswith("_scale_inv"):
                n = int(np.prod(f.shape(name)))
                total_n += n
                fp8_n += n if dt in FP8_DTYPES else 0
        mtp = sorted({int(m.group(1)) for n in reader.ckpt if (m := MTP_LAYER.match(n))})
        fp8_line = f"{fp8_n / max(total_n, 1):.1%} of parameters FP8 (with weight_scale_inv)"
        try:
            reader.validate()
        except CheckpointError as e:
            problems.append(str(e))
    lines.append(f"config: {cfg.num_layers} layers ({cfg.layer_types.count('full')} full, "
                 f"{cfg.layer_types.count('sliding')} sliding), hidden {cfg.hidden_size}, "
                 f"vocab {cfg.vocab_size}, {cfg.num_experts} experts top-"
                 f"{cfg.num_experts_per_tok}")
    lines.append(f"MTP layers found: {mtp if mtp else 'none'}")
    lines.append(f"FP8: {fp8_line}")
    lines.append(f"{'group':<18}{'dtype':<9}{'tensors':>9}{'GB':>10}")
    for (g, dt), (n, b) in sorted(stats.items()):
        lines.append(f"{g:<18}{dt:<9}{n:>9}{b / 1e9:>10.3f}")
    lines.append(f"{'total':<27}{sum(v[0] for v in stats.values()):>9}"
                 f"{sum(v[1] for v in stats.values()) / 1e9:>10.3f}")
    lines.append("inconsistencies: " + ("none" if not problems else "\n" + "\n".join(problems)))
    return "\n".join(lines)
