"""Generation on 8 simulated CPU devices (tests/conftest.py sets the device count before jax
starts): greedy tokens, speculative tokens and seeded samples identical to one device on
several mesh shapes; KV caches (ring buffers and MTP heads' too) sharded like the activations
that fill them; the mesh found from the model's own parameters."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import mimo_jax
from mimo_jax import ModelConfig
from mimo_jax import sharding as sh
from mimo_jax.inference.generate import new_cache
from mimo_jax.inference.placement import cache_shardings, serving_mesh
from mimo_jax.model.config import AttentionSpec
from mimo_jax.parallel import create_sharded

# 4 KV heads on both layer types and 8 query heads (tensor <= 4 divides them), 8 experts,
# hidden / MLP / vocab divisible by 8; window 9 < the longest prompt, so rings wrap.
CFG = ModelConfig.tiny(
    vocab_size=256, hidden_size=64, num_layers=4, intermediate_size=128,
    moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_mtp_layers=2,
    full_attention=AttentionSpec(8, 4, 16, 16, 5e6, 0.25, False, None),
    sliding_attention=AttentionSpec(8, 4, 16, 16, 1e4, 0.25, True, 9),
    max_position_embeddings=256)
PROMPTS = [[5, 9, 2], list(range(1, 21)), [7] * 11, [3, 1, 4, 1, 5, 9, 2, 6]]
# FSDP-only (batch 4 not split 8 ways: rows replicated) is extra coverage: slow-marked.
MESHES = [pytest.param("fsdp=8", marks=pytest.mark.slow), "data=2,expert=2,tensor=2",
          "expert=2,tensor=4"]


@pytest.fixture(scope="module")
def single():
    model = mimo_jax.MiMo(CFG, rngs=nnx.Rngs(0))
    greedy = mimo_jax.generate(model, PROMPTS, max_new_tokens=12, speculative=2)
    plain = mimo_jax.generate(model, PROMPTS, max_new_tokens=12)
    assert greedy.tokens == plain.tokens
    sampled = mimo_jax.generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, seed=3,
                                speculative=2)
    return greedy, sampled


def test_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_speculative_greedy_equals_single_device(mesh_spec, single):
    mesh, rules = sh.make_mesh(mesh_spec), sh.ShardingRules.preset()
    model = create_sharded(CFG, mesh, rules, seed=0)
    assert serving_mesh(model) == (mesh, rules)  # found from the parameters
    out = mimo_jax.generate(model, PROMPTS, max_new_tokens=12, speculative=2)
    assert out.tokens == single[0].tokens
    assert out.acceptance_length == pytest.approx(single[0].acceptance_length)


def test_sharded_sampling_draws_the_same_tokens(single):
    """Same seed, same distribution: the random bits do not depend on the sharding, so the
    samples (speculative sampling: drafts, acceptance tests, residuals) agree token for token,
    a stronger check than a distribution test."""
    mesh = sh.make_mesh("data=2,expert=2,tensor=2")
    model = create_sharded(CFG, mesh, sh.ShardingRules.preset(), seed=0)
    out = mimo_jax.generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, seed=3,
                            speculative=2)
    assert out.tokens == single[1].tokens


def test_caches_are_sharded_like_their_activations():
    mesh, rules = sh.make_mesh("data=2,expert=2,tensor=2"), sh.ShardingRules.preset()
    cache = new_cache(CFG, 4, 64, 2, (mesh, rules))
    batch = ("data", "expert")  # the batch axes that divide 4 rows ("fsdp" is 1 here)
    for layer in (*cache.prefix, *cache.mtp):  # [B, Hkv, S, D]
        assert layer.k.sharding.spec == P(batch, "tensor", None, None)
        assert layer.k.sharding.shard_shape(layer.k.shape)[:2] == (1, 2)
    for layer in cache.blocks:  # [blocks, B, Hkv, S, D]
        assert layer.v.sharding.spec == P(None, batch, "tensor", None, None)
    assert cache.ring_pos.sharding.spec == P(batch, None)
    assert cache.mtp_pos.sharding.spec == P(None, batch, None)
    # One row cannot be split: batch replicated, heads still over tensor.
    one = cache_shardings(jax.eval_shape(lambda: new_cache(CFG, 1, 64, 2, None)), mesh, rules,
                         CFG)
    assert one.prefix[0].k.spec == P(None, "tensor", None, None)


def test_non_preset_placement_needs_rules():
    mesh = sh.make_mesh("fsdp=2,tensor=4")
    odd = sh.ShardingRules.preset(mlp=None)  # dense MLP replicated: matches no preset
    model = create_sharded(CFG, mesh, odd, seed=0)
    with pytest.raises(ValueError, match="not a preset"):
        serving_mesh(model)
    assert serving_mesh(model, rules=odd) == (mesh, odd)
    with sh.activate(mesh, odd):
        assert serving_mesh(model) == (mesh, odd)


def test_unsharded_model_runs_on_one_device():
    model = mimo_jax.MiMo(CFG, rngs=nnx.Rngs(1))
    assert serving_mesh(model) is None
    assert new_cache(CFG, 2, 16, 1, None).prefix[0].k.sharding.device_set == {jax.devices()[0]}
