"""A release-layout FP8 checkpoint (per-head K/V grid on the global layers): loading, the
--keep-fp8 Orbax form, and exporting back with --fp8."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_util import quantize_release, save_with_mtp, tiny_model
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashForCausalLM

import mimo_jax
from mimo_jax.checkpoint import hf_to_orbax, orbax_to_hf
from mimo_jax.checkpoint.safetensors_io import SafetensorsCheckpoint


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    model = tiny_model(seed=5)
    save_with_mtp(model, str(d / "f32"), mtp_layers=1)
    os.makedirs(d / "rel")
    deq = quantize_release(str(d / "f32"), str(d / "rel"), num_kv_full=2, full_layers={0, 5})
    # transformers fed the dequantised weights (through from_pretrained, which knows how to
    # fuse the per-expert tensors)
    tensors = load_file(str(d / "f32" / "model.safetensors"))
    tensors.update({n: torch.from_numpy(deq[n]) for n in deq if n in tensors})
    os.makedirs(d / "deq")
    save_file(tensors, str(d / "deq" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(d / "f32" / "config.json", d / "deq" / "config.json")
    model = MiMoV2FlashForCausalLM.from_pretrained(str(d / "deq"), dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    return d, ids.numpy(), ref


def test_release_has_the_per_head_grid(release):
    d, _, _ = release
    ck = SafetensorsCheckpoint(str(d / "rel"))
    # 2 KV heads x 192: the per-head grid has 4 K scale rows, the uniform one would have 3.
    assert ck.shape("model.layers.0.self_attn.k_proj.weight_scale_inv") == (4, 1)
    assert ck.shape("model.layers.1.self_attn.k_proj.weight_scale_inv") == (6, 1)  # sliding
    assert ck.dtype("model.layers.0.self_attn.o_proj.weight") == np.float32


def test_fp8_release_loads_to_transformers_logits(release):
    d, ids, ref = release
    model = mimo_jax.load(str(d / "rel"), dtype="float32")
    assert np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref).max() <= 1e-4


def test_keep_fp8_round_trip_is_bit_exact(release):
    d, ids, ref = release
    dst = hf_to_orbax(str(d / "rel"), str(d / "keep"), keep_fp8=True, progress=False)
    assert json.load(open(os.path.join(dst, "mimo_jax.json")))["fp8"] is True
    out = mimo_jax.load(dst, dtype="float32")(jnp.asarray(ids))
    assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4
    back = orbax_to_hf(dst, str(d / "keep_hf"), fp8_out=True, progress=False)
    src, got = SafetensorsCheckpoint(str(d / "rel")), SafetensorsCheckpoint(back)
    assert set(src) == set(got)
    for n in src:
        assert src.dtype(n) == got.dtype(n) and src.shape(n) == got.shape(n), n
        assert np.array_equal(src.get(n).view(np.uint8), got.get(n).view(np.uint8)), n
    q = json.load(open(os.path.join(back, "config.json")))["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]
    assert "model.layers.0.self_attn.o_proj" in q["ignored_layers"]
    assert "model.mtp.layers.0.eh_proj" in q["ignored_layers"]


def test_bf16_orbax_to_fp8_within_fp8_rounding(release):
    d, _, _ = release
    dst = hf_to_orbax(str(d / "rel"), str(d / "bf16"), dtype="bf16", progress=False)
    back = orbax_to_hf(dst, str(d / "bf16_hf"), fp8_out=True, progress=False)
    src, got = SafetensorsCheckpoint(str(d / "rel")), SafetensorsCheckpoint(back)
    assert set(src) == set(got)
    for n in src:
        assert src.shape(n) == got.shape(n) and src.dtype(n) in (got.dtype(n), np.float32), n
    from mimo_jax.checkpoint.release import ReleaseReader

    a, b = ReleaseReader(str(d / "rel")), ReleaseReader(back)
    for n in src:
        if n.endswith("_scale_inv") or not a.is_fp8(n):
            continue
        x, y = a.read(n), b.read(n)
        scale = a.read_fp8(n)[1].max()
        # bf16 storage (2^-9) then E4M3 requantisation (2^-4) of every element
        assert (np.abs(x - y) <= 2**-3.5 * np.abs(x) + scale * 2**-8).all(), n


def test_inspect_both_formats(release, capsys):
    import argparse

    from mimo_jax.commands import inspect as inspect_cmd

    d, _, _ = release
    assert inspect_cmd.run(argparse.Namespace(path=str(d / "rel"))) == 0
    text = capsys.readouterr().out
    assert "MTP layers found: [0]" in text and "F8_E4M3" in text
    assert "inconsistencies: none" in text
    keep = d / "keep"
    if not keep.exists():
        hf_to_orbax(str(d / "rel"), str(keep), keep_fp8=True, progress=False)
    assert inspect_cmd.run(argparse.Namespace(path=str(keep))) == 0
    text = capsys.readouterr().out
    assert "Orbax model directory" in text and "F8_E4M3" in text and "[0]" in text
