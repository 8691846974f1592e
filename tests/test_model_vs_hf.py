"""The model against transformers 5.23 `MiMoV2FlashForCausalLM` (float32, eager), weights going
torch -> save_pretrained -> mimo_jax.load, the path a user takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import random_hf_model, save_with_mtp, torch_mtp_logits

import mimo_jax

# Every size distinct from every other so that a transposed or misread axis fails.
BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            head_dim=20, v_head_dim=12, max_position_embeddings=512)
CONFIGS = {
    # GA 1 KV head / SWA 2; seq 23 > 3 x window 5; grouped routing 4 groups pick 2; scale != 1.
    "grouped_routing": dict(BASE, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=1,
                            n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                            routed_scaling_factor=1.7, sliding_window=5),
    # Tied embeddings, GA 3 KV heads / SWA 6, window 3 keys.
    "tied": dict(BASE, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                 n_routed_experts=6, num_experts_per_tok=2, sliding_window=3,
                 tie_word_embeddings=True),
    # Non-default pattern that repeats: layers 1..6 = 2 scanned blocks of [SWA, SWA, GA].
    "scanned_pattern": dict(
        BASE, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
        n_routed_experts=7, num_experts_per_tok=2, sliding_window=6,
        layer_types=["full_attention"] + ["sliding_attention", "sliding_attention",
                                          "full_attention"] * 2,
        mlp_layer_types=["dense"] + ["sparse"] * 6),
    # Dense and MoE layers interleaved, SWA first, 8 query heads over 4/8 KV heads, no bias sel.
    "mixed_mlp": dict(BASE, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                      n_routed_experts=9, num_experts_per_tok=4, n_group=3, topk_group=2,
                      routed_scaling_factor=2.5, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                   "sliding_attention", "full_attention"],
                      mlp_layer_types=["sparse", "dense", "sparse", "dense", "sparse"]),
}
N_MTP = 2


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    hf = random_hf_model(seed=len(name), **CONFIGS[name])
    path = str(tmp_path_factory.mktemp(name))
    mtp = save_with_mtp(hf, path, N_MTP)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 23), generator=gen)
    return name, hf, mtp, path, ids


def test_logits_match_transformers(case):
    name, hf, _, path, ids = case
    with torch.no_grad():
        want = hf(ids).logits.numpy()
    model = mimo_jax.load(path, dtype="float32")
    got = np.asarray(model(jnp.asarray(ids.numpy()), compute_mtp=False).logits)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4, name
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_scanned_pattern_is_scanned():
    cfg = mimo_jax.ModelConfig.from_hf(CONFIGS["scanned_pattern"])
    from mimo_jax.model.mimo import scan_plan

    assert scan_plan(cfg) == (1, 3, 2)


@pytest.mark.parametrize("post_norm", [True, False])
def test_mtp_heads_match_torch_reference(case, post_norm):
    name, hf, mtp, path, ids = case
    want = torch_mtp_logits(hf, mtp, ids, N_MTP, post_norm=post_norm)
    model = mimo_jax.load(path, dtype="float32",
                          mtp_hidden="post_norm" if post_norm else "pre_norm")
    assert model.cfg.num_mtp_layers == N_MTP
    got = np.asarray(model(jnp.asarray(ids.numpy())).mtp_logits)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4, name
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_bf16_close_to_float32(case):
    _, _, _, path, ids = case
    x = jnp.asarray(ids.numpy())
    f32 = np.asarray(mimo_jax.load(path, dtype="float32")(x).logits)
    bf16_model = mimo_jax.load(path, dtype="bfloat16")
    assert bf16_model.embed[...].dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_model(x).logits, np.float32)
    # bf16 keeps ~3 significant digits; errors compound over layers.
    assert np.abs(bf16 - f32).max() <= 0.05 * np.abs(f32).max() + 1e-3
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("implementation", ["reference", "pallas_tpu", "pallas_gpu"])
def test_logits_match_transformers_with_each_attention_kernel(implementation, tmp_path):
    """The default (xla) path is covered above; the Pallas kernels run in interpret mode."""
    from flax import nnx

    from pallas_kernels.attn import use_implementation

    hf = random_hf_model(seed=5, **CONFIGS["grouped_routing"])
    hf.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 23), generator=gen)
    with torch.no_grad():
        want = hf(ids).logits.numpy()
    model = mimo_jax.load(tmp_path, dtype="float32")
    x = jnp.asarray(ids.numpy())
    with use_implementation(implementation):
        got = nnx.jit(lambda m, x: m(x, compute_mtp=False).logits)(model, x)
        jaxpr = str(jax.make_jaxpr(lambda x: model(x, compute_mtp=False).logits)(x))
    assert ("pallas_call" in jaxpr) == implementation.startswith("pallas")
    assert np.abs(np.asarray(got) - want).max() <= 1e-4
