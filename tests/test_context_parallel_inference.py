"""Generation on a mesh with a `context` axis (8 simulated CPU devices, tests/conftest.py).

The prefill chunk splits over `context` (contiguously), every global layer's cache splits its
slots over it (S/n slots per shard), the sliding layers' ring buffers stay whole; decode steps
run one token whole. Greedy tokens must equal one device's: with the chunk split and not split
(a chunk length that `context` does not divide), with the cache split and not (a max_len it
does not divide), with a data/fsdp axis beside it, and with speculative verification."""

from __future__ import annotations

import importlib
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import mimo_jax
from mimo_jax import ModelConfig
from mimo_jax import sharding as sh
from mimo_jax.inference.generate import new_cache
from mimo_jax.model.config import AttentionSpec
from mimo_jax.parallel import create_sharded

# Global layers in the unscanned prefix and in the scanned blocks; sinks on both kinds;
# window 7, so the rings wrap many times over prompts of ~50 tokens.
CFG = ModelConfig.tiny(
    vocab_size=128, hidden_size=32, num_layers=5, intermediate_size=64,
    moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_mtp_layers=1,
    layer_types=("full", "sliding", "full", "sliding", "full"),
    mlp_types=("dense", "moe", "moe", "moe", "moe"),
    full_attention=AttentionSpec(4, 2, 16, 8, 5e6, 0.25, True, None),
    sliding_attention=AttentionSpec(4, 2, 16, 8, 1e4, 0.25, True, 7),
    max_position_embeddings=256)
RULES = sh.ShardingRules.preset()
gen_mod = importlib.import_module("mimo_jax.inference.generate")  # the module, not the function
_rng = np.random.RandomState(0)
PROMPTS = [_rng.randint(1, CFG.vocab_size, n).tolist() for n in (50, 37)]
NEW = 8

_single: dict = {}


def single_device(chunk: int, max_len: int | None, speculative: int = 0):
    key = (chunk, max_len, speculative)
    if key not in _single:
        model = mimo_jax.MiMo(CFG, rngs=nnx.Rngs(0))
        _single[key] = mimo_jax.generate(model, PROMPTS, max_new_tokens=NEW,
                                         prefill_chunk_size=chunk, max_len=max_len,
                                         speculative=speculative)
    return _single[key]


def _global_cache_gathers(hlo: str, max_len: int) -> list[str]:
    """All-gathers whose result has a [.., S=max_len, D] tail: a whole global-layer cache."""
    shape = re.compile(rf"\[[0-9,]*,{max_len},(16|8)\]")
    op = re.compile(r"all-gather(-start)?\(")
    return [line for line in hlo.splitlines()
            if op.search(line) and shape.search(op.split(line)[0])]


def _mesh(spec: str):
    """A mesh over the first devices its axes need (the rest idle)."""
    n = math.prod(int(p.split("=")[1]) for p in spec.split(","))
    return sh.make_mesh(spec, jax.devices()[:n])


def _check(mesh_spec: str, chunk: int, max_len: int | None, speculative: int = 0):
    want = single_device(chunk, max_len, speculative)
    mesh = _mesh(mesh_spec)
    model = create_sharded(CFG, mesh, RULES, seed=0)
    gen_mod._EXECUTABLES.clear()
    out = mimo_jax.generate(model, PROMPTS, max_new_tokens=NEW, prefill_chunk_size=chunk,
                            max_len=max_len, speculative=speculative)
    assert out.tokens == want.tokens
    if speculative:
        assert out.acceptance_length == pytest.approx(want.acceptance_length)
    # No executable gathers a whole global-layer cache onto a device.
    s = max_len or 64
    for key, exe in gen_mod._EXECUTABLES.items():
        assert not _global_cache_gathers(exe.as_text(), s), key[0]


def test_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_spec,chunk,max_len", [
    ("context=4", 16, None),  # chunk split (4 tokens a shard), cache split (16 slots a shard)
    # chunk not divisible by 4: whole on each shard; cache split (slow: ~75 s on 2 cores)
    pytest.param("context=4", 10, None, marks=pytest.mark.slow),
])
def test_context_generation_equals_single_device(mesh_spec, chunk, max_len):
    _check(mesh_spec, chunk, max_len)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec,chunk,max_len,speculative", [
    ("context=4", 16, 70, 0),  # 70 slots: the cache stays whole, the chunk splits
    ("context=8", 16, None, 0),  # 2 tokens and 8 slots a shard
    ("fsdp=2,context=4", 16, None, 0),  # rows over fsdp, the sequence over context
    ("data=2,context=2", 8, None, 1),  # speculative: 2-token verify chunks split over context
])
def test_context_generation_equals_single_device_grid(mesh_spec, chunk, max_len, speculative):
    _check(mesh_spec, chunk, max_len, speculative)


def test_global_caches_split_over_context():
    mesh = _mesh("fsdp=2,context=4")
    cache = new_cache(CFG, 2, 64, 1, (mesh, RULES))
    assert cache.prefix[0].k.sharding.spec == P("fsdp", None, "context", None)  # global
    assert cache.blocks[1].v.sharding.spec == P(None, "fsdp", None, "context", None)  # global
    assert cache.blocks[0].k.sharding.spec == P(None, "fsdp", None, None, None)  # ring
    assert cache.mtp[0].k.sharding.spec == P("fsdp", None, None, None)  # MTP ring
    # Each device holds one row and 64 / 4 slots of every global layer.
    assert cache.prefix[0].k.addressable_shards[0].data.shape == (1, 2, 16, 16)
    assert cache.blocks[1].v.addressable_shards[0].data.shape == (2, 1, 2, 16, 8)
    # 70 slots do not split 4 ways: that cache stays whole (still correct, see the grid).
    odd = new_cache(CFG, 2, 70, 0, (mesh, RULES))
    assert odd.prefix[0].k.sharding.spec == P("fsdp", None, None, None)
