"""The model's kernels AOT-compiled for a TPU pod slice from this CPU host (libtpu).

- default suite: the sharded attention layer and the expert-parallel MoE path, Pallas TPU
  kernels inside, on a 4-chip v5p mesh with the real rules (Mosaic kernels cannot be
  partitioned by XLA: each must run per shard);
- slow: a whole sharded training step (loss, grads, AdamW) of a 2-layer slice of the flash
  config (full-attention + sliding/MoE layer, 1 MTP head, batch 4 x 4096), whose compiled
  memory is compared with `mimo_jax.parallel.plan`.
"""

from __future__ import annotations

import dataclasses
import platform
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels.attn as attn_kernels
import pallas_kernels.ragged as ragged_kernels
from mimo_jax.model.attention import sharded_attention
from mimo_jax.model.expert_parallel import moe_experts
from mimo_jax.model.shapes import abstract_model
from mimo_jax.parallel.plan import plan_memory
from mimo_jax.sharding.mesh import make_mesh, mesh_shape
from mimo_jax.sharding.rules import ShardingRules, activate, activation_sharding, state_shardings
from mimo_jax.train.config import PRESETS
from mimo_jax.train.optimizer import make_optimizer
from mimo_jax.train.step import make_train_step
from pallas_kernels.compile_check import MemoryUse, tpu_available, tpu_devices

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="libtpu is Linux x86-64 only")
GIB = 1 << 30


@pytest.fixture(scope="module")
def devices():
    assert tpu_available(), "no libtpu: pip install -e '.[test]' -c constraints.txt"
    return tpu_devices("v5p:2x2x1")


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _pallas_tpu():
    """The TPU kernels, compiled (not interpreted) although this host's backend is the CPU."""
    return (attn_kernels.use_implementation("pallas_tpu", interpret=False),
            ragged_kernels.use_implementation("pallas_tpu", interpret=False))


def test_sharded_attention_and_experts_compile(devices):
    mesh = make_mesh("data=1,fsdp=2,expert=1,tensor=2", devices=devices)
    rules = ShardingRules.preset("fsdp_tensor_expert")
    b, t, d = 4, 2048, 4096
    heads = NamedSharding(mesh, PartitionSpec("fsdp", None, "tensor", None))
    q = _sds((b, t, 64, 192), jnp.bfloat16, heads)
    k = _sds((b, t, 8, 192), jnp.bfloat16, heads)
    v = _sds((b, t, 8, 128), jnp.bfloat16, heads)
    sinks = _sds((64,), jnp.float32, NamedSharding(mesh, PartitionSpec("tensor")))
    seg = _sds((b, t), jnp.int32, activation_sharding(mesh, rules, (b, t), ("batch", None)))

    def attention_loss(q, k, v, sinks, seg):
        o = sharded_attention(q, k, v, sinks=sinks, window=129, segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32))

    # 256 experts of width 2048 over 8K tokens: experts over "expert" (size 1 here), expert
    # width over "tensor", model width over "fsdp" (gathered per layer).
    n, e, f, top = b * t, 256, 2048, 8
    tok = activation_sharding(mesh, rules, (n, d), ("batch", None))
    x = _sds((n, d), jnp.bfloat16, tok)
    ids = _sds((n, top), jnp.int32, activation_sharding(mesh, rules, (n, top), ("batch", None)))
    wts = _sds((n, top), jnp.float32, activation_sharding(mesh, rules, (n, top), ("batch", None)))
    gate_up = _sds((e, d, f, 2), jnp.bfloat16,
                   NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor", None)))
    down = _sds((e, f, d), jnp.bfloat16, NamedSharding(mesh, PartitionSpec(None, "tensor",
                                                                          "fsdp")))

    def experts_loss(x, ids, wts, gate_up, down):
        out = moe_experts(x, ids, wts, gate_up, down, num_experts=e, capacity_factor=None)
        return jnp.sum(out.y_td.astype(jnp.float32))

    use_attention, use_ragged = _pallas_tpu()
    with use_attention, use_ragged, activate(mesh, rules), jax.default_device(devices[0]):
        for fn, args in ((attention_loss, (q, k, v, sinks, seg)),
                         (experts_loss, (x, ids, wts, gate_up, down))):
            grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2) if fn is attention_loss else (0, 3, 4)))
            compiled = grad.trace(*args).lower().compile()
            text = compiled.as_text()
            assert "tpu_custom_call" in text  # the Mosaic kernels, not an XLA fallback
            assert MemoryUse.of(compiled).temp < 16 * GIB


def _abstract_train_state(cfg, tc, mesh, rules):
    graphdef, params, other = nnx.split(abstract_model(cfg, remat=tc.remat), nnx.Param, ...)
    place = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: _sds(x.shape, x.dtype, s), tree, state_shardings(tree, mesh, rules))
    params, other = place(params), place(other)
    tx = make_optimizer(tc)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Moments follow their parameters; the step count is replicated (as the training loop does).
    opt_state = optax.tree_map_params(
        tx, lambda s, p: _sds(s.shape, s.dtype, p.sharding), jax.eval_shape(tx.init, params),
        params, transform_non_params=lambda s: _sds(s.shape, s.dtype, replicated))
    return graphdef, params, other, opt_state, tx


@pytest.mark.slow
@pytest.mark.timeout(2400)  # XLA:TPU compiles the whole step: ~6 min on 2 loaded cores
def test_flash_slice_train_step_compiles_and_matches_plan(devices):
    """2-layer flash slice, 4 v5p chips (fsdp 2 x expert 2), float32 master weights, full
    remat, state donated: compiled memory per chip vs the plan's estimate."""
    mesh_spec, b, t = "fsdp=2,expert=2", 4, 4096
    tc = dataclasses.replace(PRESETS["flash"], model={"num_layers": 2, "num_mtp_layers": 1},
                             batch_size=b, seq_len=t)
    cfg = tc.model_config()
    mesh = make_mesh(mesh_spec, devices=devices)
    rules = ShardingRules.preset(tc.sharding_preset)
    graphdef, params, other, opt_state, tx = _abstract_train_state(cfg, tc, mesh, rules)
    batch_sharding = activation_sharding(mesh, rules, (b, t), ("batch", None))
    batch = {k: _sds((b, t), jnp.int32, batch_sharding)
             for k in ("ids", "segment_ids", "positions")}
    step_no = _sds((), jnp.int32, NamedSharding(mesh, PartitionSpec()))
    step = jax.jit(make_train_step(graphdef, tc, cfg, tx), donate_argnums=(0, 1, 2))
    use_attention, use_ragged = _pallas_tpu()
    with use_attention, use_ragged, activate(mesh, rules), jax.default_device(devices[0]):
        compiled = step.trace(params, other, opt_state, batch, step_no).lower().compile()
    mem = MemoryUse.of(compiled)
    plan = plan_memory(cfg, mesh_shape(mesh_spec, len(devices)), rules, batch=b, seq=t,
                       remat=tc.remat, loss_chunk=tc.loss_chunk_tokens)
    print(f"\ncompiled per chip: {mem}\nplan: {plan}")  # shown with pytest -s
    state = plan.params + plan.optimizer
    assert abs(mem.argument - state) <= 0.02 * state, (mem, plan)  # params + AdamW moments
    assert mem.alias >= 0.98 * state, mem  # donated: updated in place
    compiled_peak = mem.peak_estimate
    assert 0.5 * plan.train_total <= compiled_peak <= 1.25 * plan.train_total, (mem, plan)
    assert compiled_peak <= 0.9 * 95 * GIB  # fits a v5p chip with headroom
