"""hf-to-orbax / orbax-to-hf on tiny transformers checkpoints (float32 and bfloat16)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from convert_util import save_with_mtp, tiny_model
from flax import nnx

import mimo_jax
from mimo_jax.checkpoint import hf_to_orbax, orbax_to_hf
from mimo_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from mimo_jax.commands import convert as convert_cmd


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    d = tmp_path_factory.mktemp("f32")
    model = tiny_model()
    save_with_mtp(model, str(d / "hf"))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    return d, ids.numpy(), ref


def assert_same_tensors(a: str, b: str):
    x, y = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    assert set(x) == set(y)
    for n in x:
        assert x.dtype(n) == y.dtype(n) and x.shape(n) == y.shape(n), n
        assert np.array_equal(x.get(n).view(np.uint8), y.get(n).view(np.uint8)), n


def test_hf_to_orbax_matches_transformers_and_mtp(f32):
    d, ids, ref = f32
    dst = hf_to_orbax(str(d / "hf"), str(d / "orbax"), progress=False)
    assert sorted(os.listdir(dst)) == ["config.json", "mimo_jax.json", "params"]
    info = json.load(open(os.path.join(dst, "mimo_jax.json")))
    assert info["format"] == "mimo-jax-orbax" and info["dtype"] == "float32" and not info["fp8"]
    from_orbax = mimo_jax.load(dst)
    out = from_orbax(jnp.asarray(ids))
    assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4
    from_hf = mimo_jax.load(str(d / "hf"), dtype="float32")
    ref_out = from_hf(jnp.asarray(ids))
    assert out.mtp_logits.shape == (2, 2, 11, 97)
    assert np.abs(np.asarray(out.mtp_logits) - np.asarray(ref_out.mtp_logits)).max() <= 1e-5
    # Restored by plain Orbax as well: the params item is a regular StandardSave checkpoint.
    state = nnx.to_pure_dict(nnx.state(from_orbax))
    plain = ocp.StandardCheckpointer().restore(os.path.join(dst, "params"))
    np.testing.assert_array_equal(plain["embed"], np.asarray(state["embed"]))


def test_round_trip_f32_bit_exact(f32):
    d, _, _ = f32
    if not (d / "orbax").exists():
        hf_to_orbax(str(d / "hf"), str(d / "orbax"), progress=False)
    back = orbax_to_hf(str(d / "orbax"), str(d / "back"), progress=False,
                       max_shard_bytes=1 << 20)
    assert len([n for n in os.listdir(back) if n.endswith(".safetensors")]) > 2
    assert_same_tensors(str(d / "hf"), back)
    hub = json.load(open(os.path.join(back, "config.json")))
    assert hub["hybrid_layer_pattern"] == [0, 1, 1, 1, 1, 0, 1]
    assert "quantization_config" not in hub


def test_round_trip_bf16_bit_exact_via_cli(tmp_path):
    model = tiny_model(seed=3)
    save_with_mtp(model, str(tmp_path / "hf"), dtype=torch.bfloat16, mtp_layers=1)
    assert convert_cmd.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "o"),
                             "--no-progress"]) == 0
    assert json.load(open(tmp_path / "o" / "mimo_jax.json"))["dtype"] == "bfloat16"
    assert convert_cmd.main(["orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "b"),
                             "--no-progress"]) == 0
    assert_same_tensors(str(tmp_path / "hf"), str(tmp_path / "b"))


def test_existing_dst_needs_overwrite(f32, tmp_path):
    d, _, _ = f32
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_orbax(str(d / "hf"), str(dst), progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    hf_to_orbax(str(d / "hf"), str(dst), overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "mimo_jax.json").exists()
    assert [n for n in os.listdir(tmp_path) if n != "taken"] == []  # no leftovers


def test_training_workdir_layout_loads_and_exports(f32, tmp_path):
    d, ids, ref = f32
    model = mimo_jax.load(str(d / "hf"), dtype="float32")
    work = tmp_path / "work"
    state = nnx.to_pure_dict(nnx.state(model))
    # Step 3 holds other weights (a scaled LM head), so loading the wrong step shows.
    earlier = {**state, "lm_head": np.asarray(state["lm_head"]) * 2.0}
    mngr = ocp.CheckpointManager(str(work / "checkpoints"),
                                 item_names=("params", "meta"))
    for step, params in ((3, earlier), (7, state)):
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({"config": model.cfg.to_hf(), "tokenizer": {}})))
    mngr.wait_until_finished()
    mngr.close()
    for path in (work, work / "checkpoints" / "7"):  # the work dir means its latest step
        out = mimo_jax.load(str(path))(jnp.asarray(ids))
        assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4
    at3 = nnx.to_pure_dict(nnx.state(mimo_jax.load(str(work / "checkpoints" / "3"))))
    np.testing.assert_array_equal(np.asarray(at3["lm_head"]), earlier["lm_head"])
    back = orbax_to_hf(str(work), str(tmp_path / "hf"), progress=False)
    assert_same_tensors(str(d / "hf"), back)
    back3 = orbax_to_hf(str(work / "checkpoints" / "3"), str(tmp_path / "hf3"), progress=False)
    head = SafetensorsCheckpoint(back3).get("lm_head.weight")
    np.testing.assert_array_equal(head, 2.0 * SafetensorsCheckpoint(str(d / "hf")).get(
        "lm_head.weight"))
