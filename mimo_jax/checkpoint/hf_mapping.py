"""The released tensor names <-> this model's parameter tree, both directions.

One `TensorMap` per parameter (per block index for scanned layers) says which released tensors
it comes from and how their layout differs: PyTorch `nn.Linear` stores [out, in], we store
einsum-ready [in, ..., out] shapes; per-expert tensors are stacked on the expert axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import layer_location

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: Path  # flat-state path of the parameter in `MiMo`
    block: int | None  # index on the stacked "layers" axis (scanned layers), else None
    hf_names: tuple[str, ...]
    kind: str  # layout transform, see `to_model` / `to_hf`


def _layer_maps(cfg: ModelConfig, hf: str, path: Path, block: int | None, attn_type: str,
                mlp_type: str, post_norm_name: str) -> list[TensorMap]:
    def m(sub: Path, names: Sequence[str], kind: str) -> TensorMap:
        return TensorMap(path + sub, block, tuple(hf + n for n in names), kind)

    maps = [
        m(("input_norm", "weight"), ["input_layernorm.weight"], "copy"),
        m(("post_attn_norm", "weight"), [post_norm_name + ".weight"], "copy"),
        m(("attn", "q_proj"), ["self_attn.q_proj.weight"], "heads_in"),
        m(("attn", "k_proj"), ["self_attn.k_proj.weight"], "heads_in"),
        m(("attn", "v_proj"), ["self_attn.v_proj.weight"], "heads_in"),
        m(("attn", "o_proj"), ["self_attn.o_proj.weight"], "heads_out"),
    ]
    if cfg.attention_spec(attn_type).has_sink:
        maps.append(m(("attn", "sinks"), ["self_attn.attention_sink_bias"], "copy"))
    if mlp_type == "dense":
        maps += [
            m(("mlp", "gate_proj"), ["mlp.gate_proj.weight"], "linear"),
            m(("mlp", "up_proj"), ["mlp.up_proj.weight"], "linear"),
            m(("mlp", "down_proj"), ["mlp.down_proj.weight"], "linear"),
        ]
    else:
        experts = range(cfg.num_experts)
        maps.append(m(("mlp", "router"), ["mlp.gate.weight"], "linear"))
        if cfg.router_correction_bias:
            maps.append(m(("mlp", "correction_bias"), ["mlp.gate.e_score_correction_bias"], "copy"))
        maps.append(m(
            ("mlp", "gate_up"),
            [f"mlp.experts.{e}.{p}_proj.weight" for e in experts for p in ("gate", "up")],
            "experts_gate_up",
        ))
        maps.append(m(("mlp", "down"), [f"mlp.experts.{e}.down_proj.weight" for e in experts],
                      "experts_down"))
    return maps


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every released tensor of a model with this config, in checkpoint order."""
    maps = [TensorMap(("embed",), None, ("model.embed_tokens.weight",), "copy")]
    for i, (attn_type, mlp_type) in enumerate(cfg.layer_kinds):
        where, pos, block = layer_location(cfg, i)
        path: Path = ("prefix_layers", pos) if where == "prefix" else ("blocks", "layers", pos)
        maps += _layer_maps(cfg, f"model.layers.{i}.", path, block, attn_type, mlp_type,
                            "post_attention_layernorm")
    maps.append(TensorMap(("final_norm", "weight"), None, ("model.norm.weight",), "copy"))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), None, ("lm_head.weight",), "linear"))
    for k in range(cfg.num_mtp_layers):
        hf = f"model.mtp.layers.{k}."
        maps += [
            TensorMap(("mtp", k, "embed_norm", "weight"), None, (hf + "enorm.weight",), "copy"),
            TensorMap(("mtp", k, "hidden_norm", "weight"), None, (hf + "hnorm.weight",), "copy"),
            TensorMap(("mtp", k, "eh_proj"), None, (hf + "eh_proj.weight",), "linear"),
            TensorMap(("mtp", k, "final_norm", "weight"), None, (hf + "final_layernorm.weight",),
                      "copy"),
        ]
        maps += _layer_maps(cfg, hf, ("mtp", k, "layer"), None, "sliding", "dense",
                            "pre_mlp_layernorm")
    return maps


def to_model(kind: str, tensors: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Released tensors -> one parameter of `shape` (ours, without the stacked layers axis)."""
    if kind == "copy":
        return tensors[0]
    if kind == "linear":  # [out, in] -> [in, out]
        return tensors[0].T
    if kind == "heads_in":  # [n*h, d] -> [d, n, h]
        d, n, h = shape
        return tensors[0].reshape(n, h, d).transpose(2, 0, 1)
    if kind == "heads_out":  # [d, n*h] -> [n, h, d]
        n, h, d = shape
        return tensors[0].reshape(d, n, h).transpose(1, 2, 0)
    if kind == "experts_gate_up":  # E x ([f, d] gate, [f, d] up) -> [E, d, f, 2]
        e = shape[0]
        return np.stack([np.stack(tensors[2 * i : 2 * i + 2], axis=-1).transpose(1, 0, 2)
                         for i in range(e)])
    if kind == "experts_down":  # E x [d, f] -> [E, f, d]
        return np.stack([t.T for t in tensors])
    raise ValueError(f"unknown tensor kind {kind!r}")


def to_hf(kind: str, value: np.ndarray) -> list[np.ndarray]:
    """One parameter (without the stacked layers axis) -> its released tensors, in name order."""
    if kind == "copy":
        return [value]
    if kind == "linear":
        return [value.T]
    if kind == "heads_in":
        d, n, h = value.shape
        return [value.transpose(1, 2, 0).reshape(n * h, d)]
    if kind == "heads_out":
        n, h, d = value.shape
        return [value.transpose(2, 0, 1).reshape(d, n * h)]
    if kind == "experts_gate_up":
        return [value[i, :, :, c].T for i in range(value.shape[0]) for c in (0, 1)]
    if kind == "experts_down":
        return [value[i].T for i in range(value.shape[0])]
    raise ValueError(f"unknown tensor kind {kind!r}")


def hf_shapes(kind: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The released shapes of the tensors behind one parameter of `shape` (no allocation)."""
    if kind == "copy":
        return [shape]
    if kind == "linear":
        return [shape[::-1]]
    if kind == "heads_in":  # ours [d, n, h]
        return [(shape[1] * shape[2], shape[0])]
    if kind == "heads_out":  # ours [n, h, d]
        return [(shape[2], shape[0] * shape[1])]
    if kind == "experts_gate_up":  # ours [E, d, f, 2]
        return [(shape[2], shape[1])] * (2 * shape[0])
    if kind == "experts_down":  # ours [E, f, d]
        return [(shape[2], shape[1])] * shape[0]
    raise ValueError(f"unknown tensor kind {kind!r}")
