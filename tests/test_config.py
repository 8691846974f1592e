"""ModelConfig: both Hugging Face spellings, the round trip, window semantics, validation."""

from __future__ import annotations

import json

import pytest

from mimo_jax import ModelConfig
from mimo_jax.model.config import AttentionSpec, default_layer_types

# The released config.json in the hub spelling (checkpoint.md §1), minus quantization_config.
HUB_CONFIG = {
    "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
    "vocab_size": 152576, "hidden_size": 4096, "num_hidden_layers": 48,
    "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 192, "v_head_dim": 128,
    "swa_num_attention_heads": 64, "swa_num_key_value_heads": 8, "swa_head_dim": 192,
    "swa_v_head_dim": 128,
    "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(48)],
    "moe_layer_freq": [0] + [1] * 47, "sliding_window": 128, "sliding_window_size": 128,
    "attention_chunk_size": 128, "add_swa_attention_sink_bias": True,
    "add_full_attention_sink_bias": False, "attention_value_scale": 0.707,
    "partial_rotary_factor": 0.334, "rope_theta": 5000000, "swa_rope_theta": 10000,
    "max_position_embeddings": 262144, "intermediate_size": 16384, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "n_shared_experts": None, "num_experts_per_tok": 8,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": None, "hidden_act": "silu",
    "layernorm_epsilon": 1e-5, "attention_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_hub_config_is_the_flash_preset():
    assert ModelConfig.from_hf(HUB_CONFIG) == ModelConfig.flash()


def test_flash_layout():
    cfg = ModelConfig.flash()
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full"]
    assert full == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.mlp_types == ("dense",) + ("moe",) * 47
    assert cfg.sliding_attention.rotary_dim == cfg.full_attention.rotary_dim == 64
    assert (cfg.sliding_attention.num_kv_heads, cfg.full_attention.num_kv_heads) == (8, 4)
    assert cfg.sliding_attention.has_sink and not cfg.full_attention.has_sink
    assert (cfg.sliding_attention.rope_theta, cfg.full_attention.rope_theta) == (1e4, 5e6)


def test_window_follows_transformers_and_is_selectable():
    assert ModelConfig.from_hf(HUB_CONFIG).sliding_attention.window == 129
    assert ModelConfig.from_hf(HUB_CONFIG, sliding_window_keys=128).sliding_attention.window == 128
    # transformers' own spelling already counts keys including the query.
    tf = {k: v for k, v in HUB_CONFIG.items() if k != "sliding_window_size"}
    assert ModelConfig.from_hf(tf).sliding_attention.window == 128


def test_hub_round_trip(tmp_path):
    cfg = ModelConfig.from_hf(HUB_CONFIG)
    out = cfg.to_hf()
    for key, value in HUB_CONFIG.items():
        if key in ("attention_chunk_size",):
            continue  # does not change the computation
        if key == "routed_scaling_factor":
            assert out[key] == 1.0
        else:
            assert out[key] == value, key
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert ModelConfig.from_hf(tmp_path) == cfg


def test_round_trip_of_a_non_default_config():
    cfg = ModelConfig.tiny(
        layer_types=("sliding", "full", "sliding", "sliding", "full", "full", "sliding", "full"),
        mlp_types=("moe", "dense") * 4, n_group=2, topk_group=1, routed_scaling_factor=2.0,
        tie_word_embeddings=True, num_mtp_layers=1, mtp_hidden="pre_norm", value_scale=0.5,
        sliding_attention=AttentionSpec(4, 4, 32, 24, 1e4, 0.25, True, 17),
        full_attention=AttentionSpec(4, 2, 32, 24, 6.4e5, 0.25, True, None),
    )
    back = ModelConfig.from_hf(cfg.to_hf())
    assert back == cfg.replace(dtype=back.dtype, param_dtype=back.param_dtype)  # dtype = policy


def test_transformers_spelling(tmp_path):
    from transformers import MiMoV2FlashConfig

    tf = MiMoV2FlashConfig(vocab_size=101, hidden_size=32, num_hidden_layers=7,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                           v_head_dim=8, sliding_window=9, n_routed_experts=4,
                           num_experts_per_tok=2, rms_norm_eps=1e-6, routed_scaling_factor=1.5)
    tf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.layer_types == default_layer_types(7)
    assert cfg.sliding_attention.num_kv_heads == 4 and cfg.full_attention.num_kv_heads == 2
    assert cfg.sliding_attention.window == 9 and cfg.rms_norm_eps == 1e-6
    assert cfg.routed_scaling_factor == 1.5 and cfg.sliding_attention.rotary_dim == 8


@pytest.mark.parametrize("change, message", [
    (dict(full_attention=AttentionSpec(6, 4, 32, 24, 5e6, 0.25, False, None)), "not divisible"),
    (dict(sliding_attention=AttentionSpec(4, 2, 32, 24, 1e4, 0.25, True, 0)), "window"),
    (dict(layer_types=("full", "global") + ("sliding",) * 6), "unknown attention type"),
    (dict(mlp_types=("dense", "sparse") + ("moe",) * 6), "unknown mlp type"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "not divisible by n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "cannot be chosen"),
    (dict(layer_types=("full",) * 3), "layer_types"),
    (dict(num_mtp_layers=-1), "num_mtp_layers"),
    (dict(mtp_hidden="middle"), "mtp_hidden"),
    (dict(full_attention=AttentionSpec(4, 1, 32, 24, 5e6, 0.1, False, None)), "rotary dim"),
])
def test_validation_names_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**change)


def test_unsupported_hub_fields_are_rejected():
    with pytest.raises(ValueError, match="shared experts"):
        ModelConfig.from_hf({**HUB_CONFIG, "n_shared_experts": 1})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**HUB_CONFIG, "hidden_act": "gelu"})
