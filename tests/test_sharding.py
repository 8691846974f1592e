"""Sharding on 8 simulated CPU devices (tests/conftest.py): rules, meshes, sharded creation,
equality with the single-device run, expert parallelism, memory plans."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax import ModelConfig
from mimo_jax import sharding as sh
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.expert_parallel import moe_experts
from mimo_jax.parallel import create_sharded
from mimo_jax.parallel.plan import plan_memory

# Every sharded dimension divisible by 2: KV heads 2 (full) / 4 (sliding), 8 experts.
CFG = ModelConfig.tiny(full_attention=AttentionSpec(4, 2, 32, 24, 5e6, 0.25, False, None),
                       sliding_attention=AttentionSpec(4, 4, 32, 24, 1e4, 0.25, True, 9),
                       num_layers=4, num_mtp_layers=1, vocab_size=256)  # scans layers 1-3
MESHES = ["fsdp=8", "data=2,fsdp=2,expert=2", "fsdp=2,expert=2,tensor=2"]


def test_devices_are_simulated():
    assert jax.device_count() == 8


def test_rules_reject_two_dims_on_one_mesh_axis():
    rules = sh.ShardingRules.preset(mlp="fsdp")
    with pytest.raises(sh.ShardingError, match="'embed' and 'mlp' both map to mesh axis 'fsdp'"):
        rules.spec(("embed", "mlp"))
    with pytest.raises(sh.ShardingError, match="unknown mesh axes"):
        sh.ShardingRules.preset(mlp="model")
    with pytest.raises(sh.ShardingError, match="unknown sharding preset"):
        sh.ShardingRules.preset("zero3")


def test_presets():
    spec = ("experts", "embed", "expert_mlp", None)
    assert sh.ShardingRules.preset("fsdp").spec(spec) == jax.P(None, "fsdp", None, None)
    assert sh.ShardingRules.preset("fsdp_expert").spec(spec) == jax.P("expert", "fsdp", None,
                                                                       None)
    assert sh.ShardingRules.preset().spec(spec) == jax.P("expert", "fsdp", "tensor", None)


def test_make_mesh():
    mesh = sh.make_mesh("data=1,fsdp=-1,expert=4,tensor=1")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 1, "expert": 4, "tensor": 1}
    for bad, match in [("fsdp=-1,expert=-1", "at most one"), ("fsdp=3", "needs 3 devices"),
                       ("fsdp=x", "bad mesh spec"), ("pipeline=8", "unknown mesh axes"),
                       ("fsdp=-1,expert=3", "cannot be split")]:
        with pytest.raises(sh.ShardingError, match=match):
            sh.make_mesh(bad)


def _loss(model, ids):
    out = model(ids)
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
    main = -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()
    mtp = -jax.nn.log_softmax(out.mtp_logits[0, :, :-2]).max(-1).mean()
    return main + 0.3 * mtp


@pytest.fixture(scope="module")
def single_device():
    model = mimo_jax.MiMo(CFG, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (8, 12), 0, CFG.vocab_size)
    logits = nnx.jit(lambda m, x: m(x).logits)(model, ids)
    grads = nnx.jit(nnx.grad(_loss))(model, ids)
    return ids, logits, grads


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_model_matches_single_device(mesh_spec, single_device):
    ids, want_logits, want_grads = single_device
    mesh, rules = sh.make_mesh(mesh_spec), sh.ShardingRules.preset()
    model = create_sharded(CFG, mesh, rules, seed=0)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        expected = rules.spec(var.get_metadata()["axes"])
        assert var[...].sharding.spec == expected, path
        assert var[...].sharding.mesh.shape == mesh.shape
    with sh.activate(mesh, rules):
        logits = nnx.jit(lambda m, x: m(x).logits)(model, ids)
        grads = nnx.jit(nnx.grad(_loss))(model, ids)
    np.testing.assert_allclose(logits, want_logits, atol=2e-5)
    got = dict(nnx.to_flat_state(grads))
    for path, want in nnx.to_flat_state(want_grads):
        np.testing.assert_allclose(got[path][...], want[...], atol=2e-5, rtol=1e-3,
                                   err_msg=str(path))


@pytest.mark.parametrize("mesh_spec", ["expert=8", "fsdp=2,expert=4", "expert=2,tensor=4"])
def test_expert_parallel_moe_equals_unsharded(mesh_spec):
    t, d, e, f, k = 64, 16, 8, 12, 3
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d))
    ids = jnp.argsort(jax.random.uniform(keys[1], (t, e)), axis=1)[:, :k].astype(jnp.int32)
    w = jax.random.uniform(keys[2], (t, k))
    gate_up = jax.random.normal(keys[3], (e, d, f, 2)) * 0.2
    down = jax.random.normal(keys[4], (e, f, d)) * 0.2
    want = moe_experts(x, ids, w, gate_up, down, num_experts=e, capacity_factor=None).y_td
    mesh, rules = sh.make_mesh(mesh_spec), sh.ShardingRules.preset()
    with sh.activate(mesh, rules):
        got = jax.jit(lambda *a: moe_experts(*a, num_experts=e, capacity_factor=None))(
            x, ids, w, gate_up, down)
    np.testing.assert_allclose(got.y_td, want, atol=1e-5)
    assert int(got.num_dropped) == 0


def test_indivisible_mesh_fails_before_allocation():
    cfg = CFG.replace(full_attention=AttentionSpec(4, 1, 32, 24, 5e6, 0.25, False, None))
    with pytest.raises(sh.ShardingError, match=r"kv_heads.*size 1 cannot be split 2 ways"):
        create_sharded(cfg, sh.make_mesh("fsdp=4,tensor=2"), sh.ShardingRules.preset())


def test_flash_plan_on_256_chips_adds_up():
    cfg = ModelConfig.flash()
    shape = sh.mesh_shape("fsdp=-1,expert=8", 256)
    plan = plan_memory(cfg, shape, sh.ShardingRules.preset(), batch=256, seq=4096)
    print(f"flash on {shape}: replicated fraction of parameter bytes "
          f"{plan.replicated_fraction:.6%}")
    assert plan.replicated_fraction < 1e-3  # norms, sinks, router biases
    counts = mimo_jax.param_count(cfg)
    moe_layers = cfg.mlp_types.count("moe")
    assert plan.params_total_bytes == 4 * (counts.total_with_mtp + moe_layers * cfg.num_experts)
    # Bytes over all chips add up: each parameter's shard, from jax's own sharding arithmetic
    # on an abstract 256-chip mesh, times the chips that hold one.
    mesh = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape))
    rules = sh.ShardingRules.preset()
    per_device = 0
    for _, var in nnx.to_flat_state(nnx.state(mimo_jax.abstract_model(cfg))):
        shard = jax.sharding.NamedSharding(mesh, rules.spec(var.get_metadata()["axes"]))
        per_device += math.prod(shard.shard_shape(var.shape)) * 4
    assert plan.params == per_device
    assert plan.params * plan.devices >= plan.params_total_bytes
    assert plan.fits("v5p") and not plan.fits("v5e")


def test_multi_process_detection():
    from mimo_jax.parallel.distributed import is_multi_process_environment

    assert not is_multi_process_environment({})
    assert not is_multi_process_environment({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert is_multi_process_environment({"TPU_WORKER_HOSTNAMES": "t-0,t-1"})
    assert is_multi_process_environment({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not is_multi_process_environment({"SLURM_NTASKS": "1"})


def test_load_restores_directly_into_shards(tmp_path):
    from hf_reference import random_hf_model

    from mimo_jax.checkpoint.convert import hf_to_orbax

    hf = random_hf_model(vocab_size=64, hidden_size=32, intermediate_size=48,
                         moe_intermediate_size=16, head_dim=24, v_head_dim=8,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         n_routed_experts=4, num_experts_per_tok=2, sliding_window=4)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "orbax"), dtype="float32",
                progress=False)
    ids = jax.random.randint(jax.random.key(0), (4, 10), 0, 64)
    want = nnx.jit(lambda m, x: m(x).logits)(mimo_jax.load(tmp_path / "hf", dtype="float32"), ids)
    mesh, rules = sh.make_mesh("fsdp=2,expert=2,tensor=2"), sh.ShardingRules.preset()
    for src in ("hf", "orbax"):
        model = mimo_jax.load(tmp_path / src, dtype="float32", mesh=mesh, rules=rules)
        for path, var in nnx.to_flat_state(nnx.state(model)):
            assert var[...].sharding.spec == rules.spec(var.get_metadata()["axes"]), (src, path)
        with sh.activate(mesh, rules):
            got = nnx.jit(lambda m, x: m(x).logits)(model, ids)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=src)
