"""FP8 weights kept in FP8 (`load(..., keep_fp8=True)`): a release-layout checkpoint (per-head
K/V grid on the global layers, partial column blocks) loads as E4M3 payloads + block scales,
dequantises inside the matmuls to exactly the host-dequantised bfloat16 weights, generates the
same tokens (plain, speculative, sharded), and the keep-FP8 Orbax format does the same."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from convert_util import quantize_release, save_with_mtp, tiny_model
from flax import nnx
from jax.sharding import PartitionSpec as P

import mimo_jax
from mimo_jax import sharding as sh
from mimo_jax.checkpoint import hf_to_orbax
from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.fp8_linear import E4M3, FP8Weight, dequantize, fp8_weights

PROMPTS = [[3, 14, 15, 92], list(range(20, 40)), [7, 7, 7]]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_inference")
    save_with_mtp(tiny_model(seed=5), str(d / "f32"), mtp_layers=2)
    os.makedirs(d / "rel")
    quantize_release(str(d / "f32"), str(d / "rel"), num_kv_full=2, full_layers={0, 5})
    return d


@pytest.fixture(scope="module")
def models(release):
    deq = mimo_jax.load(str(release / "rel"), dtype="bf16")  # dequantised on the host
    kept = mimo_jax.load(str(release / "rel"), dtype="bf16", keep_fp8=True)
    return deq, kept


def _at(model, path):
    node = model
    for k in path:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def test_fp8_weights_are_kept_with_their_grids(models):
    deq, kept = models
    weights = dict(fp8_weights(kept))
    # Per main layer: q, k, v + (dense gate, up, down | experts gate_up, down); per MTP head:
    # q, k, v, gate, up, down. Never o_proj, the router, eh_proj, embeddings, norms.
    cfg = kept.cfg
    want = sum(6 if m == "dense" else 5 for m in cfg.mlp_types) + 6 * cfg.num_mtp_layers
    assert len(weights) == want
    assert not any(p[-1] in ("o_proj", "router", "eh_proj", "embed", "lm_head") for p in weights)
    for path, w in weights.items():
        assert w.payload.get_value().dtype == E4M3, path
        assert w.scale_inv.get_value().dtype == jnp.float32, path
        assert w.dtype == "bfloat16", path
    # Global layers (0 and 5: prefix 0 and the scanned full slot) keep K/V on 64-row blocks.
    assert weights[("prefix_layers", 0, "attn", "k_proj")].blocks == (128, 64)
    assert weights[("prefix_layers", 0, "attn", "v_proj")].blocks == (128, 64)
    assert weights[("prefix_layers", 1, "attn", "k_proj")].blocks == (128, 128)
    assert weights[("prefix_layers", 0, "attn", "q_proj")].blocks == (128, 128)


def test_dequantised_in_the_matmul_equals_host_dequantised(models):
    deq, kept = models
    for path, w in fp8_weights(kept):
        want = np.asarray(_at(deq, path)[...], np.float32)
        np.testing.assert_array_equal(np.asarray(w[...], np.float32), want, err_msg=str(path))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 13)))
    fwd = nnx.jit(lambda m, x: m(x))
    a, b = fwd(deq, ids), fwd(kept, ids)
    np.testing.assert_allclose(np.asarray(b.logits, np.float32), np.asarray(a.logits, np.float32),
                               atol=2e-2, rtol=2e-2)  # bf16 tolerance (identical in practice)
    np.testing.assert_allclose(np.asarray(b.mtp_logits, np.float32),
                               np.asarray(a.mtp_logits, np.float32), atol=2e-2, rtol=2e-2)


def test_memory_halves(models):
    deq, kept = models
    quantised = {p for p, _ in fp8_weights(kept)}
    bf16 = sum(int(np.prod(_at(deq, p).shape)) * 2 for p in quantised)
    fp8 = sum(w.nbytes for _, w in fp8_weights(kept))
    assert 0.5 <= fp8 / bf16 < 0.55, fp8 / bf16  # 1 byte + scales (partial blocks here)


def test_greedy_tokens_equal_dequantised_model(models):
    """Batch 3, speculative K = 2 (the MTP heads' FP8 weights too)."""
    deq, kept = models
    want = mimo_jax.generate(deq, PROMPTS, max_new_tokens=10, speculative=2)
    got = mimo_jax.generate(kept, PROMPTS, max_new_tokens=10, speculative=2)
    assert got.tokens == want.tokens


def test_single_row_decode_reads_only_the_experts_it_uses(models):
    """Batch 1, plain decoding: T*K = 2 assignments < 4 experts, so each step takes the
    gathered-experts path (only the used experts dequantised); tokens still equal the
    dequantised model's."""
    deq, kept = models
    want = mimo_jax.generate(deq, PROMPTS[1:2], max_new_tokens=10)
    got = mimo_jax.generate(kept, PROMPTS[1:2], max_new_tokens=10)
    assert got.tokens == want.tokens


def test_gathered_experts_equal_the_grouped_path():
    from mimo_jax.model.expert_parallel import moe_experts
    from mimo_jax.model.fp8_linear import FP8Payload, FP8Scale, gathered_experts_apply

    rng = np.random.default_rng(0)
    e, d, f, t, k = 8, 160, 48, 3, 2  # partial 128-blocks on both weight dims
    gu8 = jnp.asarray(rng.standard_normal((e, d, f, 2)), E4M3)
    dn8 = jnp.asarray(rng.standard_normal((e, f, d)), E4M3)
    gus = jnp.asarray(rng.uniform(0.01, 0.05, (e, 2, 1, 2)), jnp.float32)
    dns = jnp.asarray(rng.uniform(0.01, 0.05, (e, 1, 2)), jnp.float32)
    gate_up = FP8Weight(FP8Payload(gu8), FP8Scale(gus), blocks=(1, 128, 128, 1),
                        shape=(e, d, f, 2), dtype=jnp.float32)
    down = FP8Weight(FP8Payload(dn8), FP8Scale(dns), blocks=(1, 128, 128), shape=(e, f, d),
                     dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    ids = jnp.asarray([[0, 5], [5, 7], [2, 1]], jnp.int32)
    w = jnp.asarray(rng.uniform(0, 1, (t, k)), jnp.float32)
    got = gathered_experts_apply(gate_up, down, x, ids, w)
    want = moe_experts(x, ids, w, gate_up[...], down[...], num_experts=e,
                       capacity_factor=None).y_td
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert gathered_experts_apply(gate_up, down, jnp.tile(x, (2, 1)), jnp.tile(ids, (2, 1)),
                                  jnp.tile(w, (2, 1))) is None  # 12 >= 8: grouped is cheaper


def test_keep_fp8_orbax_directory(release, models):
    deq, kept = models
    dst = hf_to_orbax(str(release / "rel"), str(release / "keep"), keep_fp8=True,
                      progress=False)
    from_orbax = mimo_jax.load(dst, dtype="bf16", keep_fp8=True)
    got = {p: w for p, w in fp8_weights(from_orbax)}
    assert set(got) == {p for p, _ in fp8_weights(kept)}
    for path, w in fp8_weights(kept):
        np.testing.assert_array_equal(got[path].payload.get_value().view(np.uint8),
                                      w.payload.get_value().view(np.uint8), err_msg=str(path))
        np.testing.assert_array_equal(got[path].scale_inv.get_value(), w.scale_inv.get_value())
    ids = jnp.asarray([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(from_orbax(ids).logits, np.float32),
                                  np.asarray(kept(ids).logits, np.float32))


def test_sharded_fp8_generation(release, models):
    """Payloads sharded like their parameters (heads / MLP over tensor, experts over expert,
    model width over fsdp), scales replicated; tokens equal the single-device FP8 model's."""
    deq, kept = models
    mesh = sh.make_mesh("fsdp=2,expert=2,tensor=2")
    rules = sh.ShardingRules.preset(vocab=None)  # vocabulary 97 is not divisible
    model = mimo_jax.load(str(release / "rel"), dtype="bf16", keep_fp8=True, mesh=mesh,
                          rules=rules)
    q = _at(model, ("prefix_layers", 0, "attn", "q_proj"))
    assert isinstance(q, FP8Weight)
    assert q.payload.get_value().sharding.spec == P("fsdp", "tensor")
    assert q.scale_inv.get_value().sharding.spec == P(None, None)
    experts = _at(model, ("prefix_layers", 1, "mlp", "gate_up"))
    assert experts.payload.get_value().sharding.spec[0] == "expert"
    want = mimo_jax.generate(kept, PROMPTS, max_new_tokens=8, speculative=1)
    got = mimo_jax.generate(model, PROMPTS, max_new_tokens=8, speculative=1, rules=rules)
    assert got.tokens == want.tokens


def test_partial_blocks_and_stacked_dequantize():
    payload = jnp.asarray(np.random.default_rng(0).standard_normal((3, 130, 70)), E4M3)
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2, (3, 2, 1)), jnp.float32)
    got = np.asarray(dequantize(payload, scale, (128, 128), jnp.float32))
    want = np.asarray(payload, np.float32) * np.repeat(np.asarray(scale), 128, axis=1)[:, :130]
    np.testing.assert_array_equal(got, want)


def test_keep_fp8_errors(release, tmp_path):
    with pytest.raises(CheckpointError, match="no FP8 tensors"):
        mimo_jax.load(str(release / "f32"), keep_fp8=True)
    plain = hf_to_orbax(str(release / "f32"), str(tmp_path / "plain"), progress=False)
    with pytest.raises(CheckpointError, match="holds none"):
        mimo_jax.load(plain, keep_fp8=True)


def test_serving_plan_for_fp8_flash_on_8_h200():
    """The release on one 8 x H200 node: FP8 weights (and their scales) take about half the
    bf16 bytes; the KV cache per device is the inference cache's own byte count for the rows
    a device holds; FP8 fits where bf16 does not."""
    from mimo_jax import ModelConfig, param_count
    from mimo_jax.inference import cache_bytes
    from mimo_jax.parallel.plan import format_serving, plan_serving
    from mimo_jax.sharding.mesh import mesh_shape

    cfg, rules = ModelConfig.flash(), sh.ShardingRules.preset()
    ep8 = mesh_shape("expert=8", 8)
    fp8 = plan_serving(cfg, ep8, rules, batch=16, context=65536, weights="fp8")
    bf16 = plan_serving(cfg, ep8, rules, batch=16, context=65536, weights="bf16")
    counts = param_count(cfg)
    moe = cfg.num_experts * cfg.mlp_types.count("moe")
    # Routers are float32 (2 more bytes each); correction biases (float32) are not Params.
    assert bf16.params_total_bytes == 2 * counts.total_with_mtp + 2 * cfg.hidden_size * moe + (
        4 * moe)
    assert 0.5 < fp8.params_total_bytes / bf16.params_total_bytes < 0.52
    assert 0.5 < fp8.params / bf16.params < 0.56  # replicated bf16 parts (o_proj, embeddings)
    assert fp8.kv_cache == cache_bytes(cfg, 2, 65536)["total"]  # 16 rows over 8 devices
    assert fp8.fits("H200") and fp8.total < 60 * 2**30
    dp = mesh_shape("data=2,expert=4", 8)  # experts over 4 only: 2x the expert bytes each
    assert plan_serving(cfg, dp, rules, batch=16, context=65536, weights="fp8").fits("H200")
    assert not plan_serving(cfg, dp, rules, batch=16, context=65536, weights="bf16").fits("H200")
    text = format_serving(fp8)
    assert "weights (fp8)" in text and "H200 (141 GiB): yes" in text


def test_quantize_model_as_the_release_does(models):
    """A bf16 model quantised in memory (`quantize_model`): the release's parameters become
    FP8 (per-head 64-row K/V grid on the global layers) within E4M3 rounding of the weights."""
    from mimo_jax.checkpoint.fp8_keep import quantize_model

    deq, kept = models
    q = quantize_model(deq)
    got = dict(fp8_weights(q))
    assert set(got) == {p for p, _ in fp8_weights(kept)}
    assert got[("prefix_layers", 0, "attn", "v_proj")].blocks == (128, 64)
    for path, w in got.items():
        x = np.asarray(_at(deq, path)[...], np.float32)
        y = np.asarray(w[...], np.float32)
        tol = 2**-3.5 * np.abs(x) + np.abs(x).max() * 2**-9
        assert (np.abs(x - y) <= tol).all(), path
