"""Rollouts: their log-probs equal the training forward's, and routing replay reproduces them
(and removes the routing mismatch that a changed router causes without replay)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax.model.config import AttentionSpec, ModelConfig
from mimo_jax.model.layers import RouterBias
from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train.logprobs import sequence_logprobs
from mimo_jax.post_train.rollout import num_moe_layers, rollout

STOP = 5


def micro_config(**kw) -> ModelConfig:
    # Prefix layers and scanned blocks, a 6-key sliding window (ring buffers wrap), MoE top-2.
    base = dict(vocab_size=64, hidden_size=32, num_layers=5, num_mtp_layers=0,
                layer_types=("sliding", "sliding", "full", "sliding", "full"),
                full_attention=AttentionSpec(2, 1, 16, 16, 10_000.0, 0.5, False, None),
                sliding_attention=AttentionSpec(2, 1, 16, 16, 10_000.0, 0.5, True, 6),
                intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2)
    base.update(kw)
    return ModelConfig.tiny(**base)


@pytest.fixture(scope="module")
def setup():
    model = MiMo(micro_config(), rngs=nnx.Rngs(0))
    # Larger weights than the init's: peaked next-token distributions, and experts whose
    # choice changes the log-probs visibly.
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        if path[-1] in ("down", "lm_head", "embed"):
            var.set_value(var.get_value() * 15.0)
    nnx.update(model, nnx.from_flat_state(flat))
    prompts = [[1, 2, 3], [4, 6, 7, 8, 9, 10, 11], [12], [13, 14]]
    ro = rollout(model, prompts, max_new_tokens=12, temperature=0.8, key=jax.random.key(3),
                 stop_tokens=[STOP])
    return model, prompts, ro


def _logp(model, ro, **kw):
    lp, router = sequence_logprobs(model, jnp.asarray(ro.tokens), jnp.asarray(ro.lengths),
                                   temperature=0.8, **kw)
    return np.asarray(lp), router


def test_rollout_layout(setup):
    model, prompts, ro = setup
    b, seq = ro.tokens.shape
    assert seq == 8 + 12  # prompt padded to a multiple of 8
    assert ro.expert_ids.shape == (num_moe_layers(model.cfg), b, seq, 2)
    for i, p in enumerate(prompts):
        assert ro.tokens[i, : len(p)].tolist() == p
        n_new = ro.lengths[i] - len(p)
        assert 1 <= n_new <= 12
        new = ro.tokens[i, len(p) : ro.lengths[i]].tolist()
        # Stops at the first stop token, or after 12 tokens.
        assert STOP not in new[:-1] and (new[-1] == STOP or n_new == 12)
        assert np.all(ro.tokens[i, ro.lengths[i]:] == 0)
        assert ro.response_mask[i].sum() == n_new
        assert np.all(ro.logp[i][ro.response_mask[i]] < 0)
        assert np.all(ro.logp[i][~ro.response_mask[i]] == 0)
    assert (ro.lengths - ro.prompt_lengths).max() > 1


def test_rollout_logprobs_equal_training_forward(setup):
    model, _, ro = setup
    lp, router = _logp(model, ro)
    mask = ro.response_mask
    np.testing.assert_allclose(lp[mask], ro.logp[mask], atol=2e-5)
    # The experts recorded for every token that a scored log-prob depends on are the ones the
    # training forward chooses for it.
    deps = np.arange(ro.tokens.shape[1])[None] < (ro.lengths - 1)[:, None]
    same = (np.sort(np.asarray(router.expert_ids), -1) == np.sort(ro.expert_ids, -1)).all(-1)
    assert same[:, deps].all()


def test_routing_replay(setup):
    model, _, ro = setup
    mask = ro.response_mask
    replay = jnp.asarray(ro.expert_ids)
    lp_replay, router = _logp(model, ro, expert_ids=replay)
    np.testing.assert_allclose(lp_replay[mask], ro.logp[mask], atol=2e-5)
    assert np.array_equal(np.asarray(router.expert_ids), ro.expert_ids)

    # Perturb the correction bias (it moves selection only, not the gate weights): without
    # replay the trainer routes differently and its log-probs differ; with replay it
    # reproduces the rollout's log-probs.
    moved = nnx.clone(model)
    biases = nnx.state(moved, RouterBias)
    flat = nnx.to_flat_state(biases)
    for i, (_, var) in enumerate(flat):
        var.set_value(jax.random.normal(jax.random.key(i), var.get_value().shape) * 2.0)
    nnx.update(moved, nnx.from_flat_state(flat))
    lp_free, free = _logp(moved, ro)
    deps = np.arange(ro.tokens.shape[1])[None] < (ro.lengths - 1)[:, None]
    same = (np.sort(np.asarray(free.expert_ids), -1) == np.sort(ro.expert_ids, -1)).all(-1)
    assert 1.0 - same[:, deps].mean() > 0.2  # routing mismatch without replay
    assert np.abs(lp_free[mask] - ro.logp[mask]).max() > 1e-2
    lp_moved_replay, _ = _logp(moved, ro, expert_ids=replay)
    np.testing.assert_allclose(lp_moved_replay[mask], ro.logp[mask], atol=2e-5)


def test_rollout_rejects_bad_settings(setup):
    model, prompts, _ = setup
    with pytest.raises(ValueError, match="temperature"):
        rollout(model, prompts, max_new_tokens=4, temperature=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least one token"):
        rollout(model, [[]], max_new_tokens=4, key=jax.random.key(0))
