"""Fixtures for the conversion tests: tiny transformers checkpoints, MTP tensors, FP8 releases."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo_jax.checkpoint import fp8
from mimo_jax.checkpoint.hf_mapping import hf_shapes, tensor_maps
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.shapes import abstract_model

QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "_proj.weight")


def tiny_model(seed: int = 0, **overrides) -> MiMoV2FlashForCausalLM:
    """7 layers (full attention at 0 and 5, so two scanned repeats follow a prefix), q/k head
    dim 192, v head dim 128, 2 KV heads on full layers (4 on sliding ones), hidden 64 (so FP8
    column blocks are partial)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
              num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=192,
              v_head_dim=128, n_routed_experts=4, num_experts_per_tok=2, sliding_window=5,
              max_position_embeddings=128)
    kw.update(overrides)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "sinks" in n or "correction" in n:
                p.normal_(0, 1.0)
            elif "norm" in n:
                p.uniform_(0.5, 1.5)
        for n, b in model.named_buffers():
            if "correction" in n:
                b.normal_(0, 0.3)
    return model


def _index(directory: str) -> None:
    weight_map = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            for key in load_file(os.path.join(directory, name)):
                weight_map[key] = name
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_with_mtp(model, directory: str, *, dtype=torch.float32, mtp_layers: int = 2,
                  seed: int = 1) -> None:
    """save_pretrained, plus MTP tensors under the released names in a second shard."""
    model.to(dtype).save_pretrained(directory)
    model.float()
    cfg = ModelConfig.from_hf(directory).replace(num_mtp_layers=mtp_layers)
    shapes = {p: tuple(v.shape) for p, v in
              __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(
                  abstract_model(cfg)))}
    g = torch.Generator().manual_seed(seed)
    extra = {}
    for m in tensor_maps(cfg):
        if m.path[0] != "mtp":
            continue
        for name, shape in zip(m.hf_names, hf_shapes(m.kind, shapes[m.path]), strict=True):
            if "norm" in name:
                t = 1 + 0.2 * torch.randn(shape, generator=g)
            else:
                t = 0.1 * torch.randn(shape, generator=g)
            extra[name] = t.to(dtype)
    save_file(extra, os.path.join(directory, "model-mtp.safetensors"), metadata={"format": "pt"})
    _index(directory)


def quantize_release(src: str, dst: str, num_kv_full: int, full_layers: set[int]) -> dict:
    """The release's FP8 layout from a float checkpoint: q/k/v, dense MLPs and experts as
    E4M3 + float32 128x128 weight_scale_inv (per-head K/V grid on full layers), the rest
    kept; three shards. Returns the dequantised float32 weights (computed independently of
    mimo_jax's dequantiser, from checkpoint.md §4's table)."""
    tensors = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, name)))
    out, deq = {}, {}
    for name, t in tensors.items():
        if not (name.endswith("_proj.weight") and ("self_attn" in name or "mlp" in name)
                and "o_proj" not in name and "eh_proj" not in name):
            out[name] = t
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        full = layer in full_layers and ("k_proj" in name or "v_proj" in name)
        w = t.float().numpy()
        if full:
            k = tensors[name.replace("v_proj", "k_proj")].float().numpy()
            v = tensors[name.replace("k_proj", "v_proj")].float().numpy()
            kq, ks, vq, vs = fp8.quantize_kv(k, v, num_kv_full)
            q, s = (kq, ks) if "k_proj" in name else (vq, vs)
        else:
            q, s = fp8.quantize(w)
        out[name] = torch.from_numpy(q.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = torch.from_numpy(s)
        deq[name] = _reference_dequant(name, q, s, full, num_kv_full, tensors)
    names = sorted(out)
    for i, part in enumerate((names[0::3], names[1::3], names[2::3])):
        save_file({n: out[n].contiguous() for n in part},
                  os.path.join(dst, f"model-{i + 1:05d}-of-00003.safetensors"),
                  metadata={"format": "pt"})
    _index(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return deq


def _reference_dequant(name, q, s, full, n_kv, tensors) -> np.ndarray:
    """Element-by-element table of checkpoint.md §4.1/§4.2 (slow, obviously right)."""
    w = q.astype(np.float32)
    rows, cols = w.shape
    out = np.empty_like(w)
    if not full:
        for i in range(rows):
            out[i] = w[i] * s[i // 128][np.arange(cols) // 128]
        return out
    if "k_proj" in name:
        dk = rows // n_kv
        for i in range(rows):
            h, r = divmod(i, dk)
            out[i] = w[i] * s[2 * h + r // 128][np.arange(cols) // 128]
        return out
    k_name = name.replace("v_proj", "k_proj")
    k = tensors[k_name].float().numpy()
    _, k_scale, _, _ = fp8.quantize_kv(k, tensors[name].float().numpy(), n_kv)
    dv = rows // n_kv
    for i in range(rows):
        h, r = divmod(i, dv)
        row = k_scale[2 * h + 1] if r < 64 else s[h]
        out[i] = w[i] * row[np.arange(cols) // 128]
    return out
