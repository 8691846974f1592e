"""Passkey retrieval: prompts of the asked length with the key at the asked depth, and the
teacher-forced retrieval check on a small model (one compiled program per length bucket)."""

from __future__ import annotations

import pytest
from flax import nnx

from mimo_jax import MiMo, ModelConfig
from mimo_jax.eval.passkey import passkey_prompt, passkey_retrieval
from mimo_jax.eval.tokenizer import spec_tokenizer
from mimo_jax.model.config import AttentionSpec

BYTES = spec_tokenizer({"kind": "byte"})


@pytest.mark.parametrize("length", [420, 900])
def test_prompt_fills_the_length_and_places_the_key(length):
    starts = []
    for depth in (0.0, 0.5, 1.0):
        context, answer = passkey_prompt(BYTES, length, depth, "31415")
        assert length - 120 < len(context) + len(answer) <= length  # filler is ~90 bytes
        assert BYTES.decode(answer) == " 31415"
        text = BYTES.decode(context)
        assert text.endswith("What is the pass key? The pass key is")
        starts.append(text.index("The pass key is 31415") / len(text))
    assert starts[0] < starts[1] < starts[2]  # deeper keys sit later in the prompt
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(BYTES, 100, 0.5, "31415")


def test_retrieval_scores_every_cell_with_one_program_per_bucket():
    cfg = ModelConfig.tiny(
        vocab_size=260, hidden_size=32, num_layers=2, intermediate_size=48, num_mtp_layers=0,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, layer_types=("full", "sliding"),
        full_attention=AttentionSpec(4, 2, 16, 8, 5e6, 0.5, False, None),
        sliding_attention=AttentionSpec(4, 2, 16, 8, 1e4, 0.5, True, 16))
    model = MiMo(cfg, rngs=nnx.Rngs(0))
    res = passkey_retrieval(model, BYTES, lengths=(256, 384), depths=(0.0, 1.0), trials=2)
    assert [(r["length"], r["depth"], r["trials"]) for r in res.rows] == [
        (256, 0.0, 2), (256, 1.0, 2), (384, 0.0, 2), (384, 1.0, 2)]
    for r in res.rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["mean_key_logprob"] < 0
    assert set(res.accuracy_by_length) == {256, 384}
    assert res.compilations <= 2  # buckets 256 and 384
    assert res.as_dict()["accuracy_by_length"].keys() == {"256", "384"}
