"""Helpers for tests against the PyTorch reference (transformers 5.23 `MiMoV2FlashForCausalLM`).

transformers has no MTP heads, so `torch_mtp_logits` is an independent PyTorch implementation
of checkpoint.md §3M, written from the spec rather than from our JAX code.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM


def random_hf_model(seed: int = 0, **config) -> MiMoV2FlashForCausalLM:
    """A random transformers model; sinks and router biases get non-trivial values."""
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(MiMoV2FlashConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sinks" in name:
                p.normal_(0.0, 1.0)
            elif "norm" in name:  # ones would hide a misapplied norm weight
                p.normal_(1.0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.3)
    return model


def mtp_tensors(cfg: MiMoV2FlashConfig, n_mtp: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random MTP-layer tensors under the released names (SWA geometry, dense MLP)."""
    g = torch.Generator().manual_seed(seed)
    d, hq, hkv = cfg.hidden_size, cfg.num_attention_heads, 2 * cfg.num_key_value_heads
    hd, vd, f = cfg.head_dim, cfg.v_head_dim, cfg.intermediate_size

    def w(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    out = {}
    for k in range(n_mtp):
        p = f"model.mtp.layers.{k}."
        out.update({
            p + "enorm.weight": 1 + w(d, std=0.1),
            p + "hnorm.weight": 1 + w(d, std=0.1),
            p + "eh_proj.weight": w(d, 2 * d),
            p + "input_layernorm.weight": 1 + w(d, std=0.1),
            p + "self_attn.q_proj.weight": w(hq * hd, d),
            p + "self_attn.k_proj.weight": w(hkv * hd, d),
            p + "self_attn.v_proj.weight": w(hkv * vd, d),
            p + "self_attn.o_proj.weight": w(d, hq * vd),
            p + "self_attn.attention_sink_bias": w(hq, std=1.0),
            p + "pre_mlp_layernorm.weight": 1 + w(d, std=0.1),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "final_layernorm.weight": 1 + w(d, std=0.1),
        })
    return out


def save_with_mtp(model: MiMoV2FlashForCausalLM, path: str,
                  n_mtp: int) -> dict[str, torch.Tensor]:
    """`save_pretrained` (the path users take), plus MTP tensors in a second safetensors file."""
    model.save_pretrained(path)
    tensors = mtp_tensors(model.config, n_mtp)
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(path, "model-mtp.safetensors"))
    return tensors


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _swa_attention(x, p, cfg, positions):
    """Sliding-window attention with sinks, value scale, partial RoPE (checkpoint.md §3.2-3.4)."""
    t = x.shape[1]
    hq, hkv = cfg.num_attention_heads, 2 * cfg.num_key_value_heads
    hd, vd = cfg.head_dim, cfg.v_head_dim
    q = (x @ p["self_attn.q_proj.weight"].T).view(-1, t, hq, hd)
    k = (x @ p["self_attn.k_proj.weight"].T).view(-1, t, hkv, hd)
    v = (x @ p["self_attn.v_proj.weight"].T).view(-1, t, hkv, vd) * cfg.attention_value_scale
    rope = cfg.rope_parameters["sliding_attention"]
    rd = int(hd * rope["partial_rotary_factor"])
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, rd, 2).float() / rd))
    ang = positions[:, :, None].float() * inv
    ang = torch.cat([ang, ang], -1)[:, :, None]
    cos, sin = ang.cos(), ang.sin()

    def rot(z):
        zr = z[..., :rd]
        half = torch.cat([-zr[..., rd // 2:], zr[..., : rd // 2]], -1)
        return torch.cat([zr * cos + half * sin, z[..., rd:]], -1)

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / hd**0.5
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (j > i - cfg.sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = p["self_attn.attention_sink_bias"].view(1, hq, 1, 1).expand(scores.shape[0], hq, t, 1)
    probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    o = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(-1, t, hq * vd)
    return o @ p["self_attn.o_proj.weight"].T


@torch.no_grad()
def torch_mtp_logits(model: MiMoV2FlashForCausalLM, tensors: dict[str, torch.Tensor],
                     ids: torch.Tensor, n_mtp: int, post_norm: bool = True) -> np.ndarray:
    """[n_mtp, B, T, V]: head k at position t sees (main hidden h[t], token t+k+1)."""
    cfg = model.config
    eps = cfg.rms_norm_eps
    captured = []
    last_layer = model.model.layers[-1]
    hook = last_layer.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        h_normed = model.model(ids).last_hidden_state
    finally:
        hook.remove()
    h = h_normed if post_norm else captured[0]
    b, t = ids.shape
    positions = torch.arange(t)[None].expand(b, t)
    embed, lm_head = model.model.embed_tokens.weight, model.lm_head.weight
    logits = []
    for k in range(n_mtp):
        p = {n[len(f"model.mtp.layers.{k}."):]: v for n, v in tensors.items()
             if n.startswith(f"model.mtp.layers.{k}.")}
        nxt = torch.cat([ids[:, k + 1:], torch.zeros(b, min(k + 1, t), dtype=ids.dtype)], 1)[:, :t]
        e = _rms(F.embedding(nxt, embed), p["enorm.weight"], eps)
        z = torch.cat([e, _rms(h, p["hnorm.weight"], eps)], -1) @ p["eh_proj.weight"].T
        z = z + _swa_attention(_rms(z, p["input_layernorm.weight"], eps), p, cfg, positions)
        x = _rms(z, p["pre_mlp_layernorm.weight"], eps)
        z = z + (F.silu(x @ p["mlp.gate_proj.weight"].T) * (x @ p["mlp.up_proj.weight"].T)) @ \
            p["mlp.down_proj.weight"].T
        logits.append(_rms(z, p["final_layernorm.weight"], eps) @ lm_head.T)
    return torch.stack(logits).numpy()
