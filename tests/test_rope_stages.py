"""Training stages: a context extension changes the RoPE bases and the length on resume."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mimo_jax import ModelConfig
from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import STAGE_MODEL_FIELDS, stage_changes
from mimo_jax.train import TrainConfig, load_checkpoint, train

SMALL = {"model.num_layers": 2, "model.hidden_size": 32, "model.intermediate_size": 64,
         "model.moe_intermediate_size": 16, "model.vocab_size": 260, "seq_len": 32,
         "batch_size": 4, "data.val_batches": 0, "val_every": 1000, "save_every": 1000,
         "progress_bar": False, "console_every": 1000, "tensorboard": False,
         "model.max_position_embeddings": 64, "model.full_attention": {"rope_theta": 640_000.0},
         "async_checkpointing": False}
EXTEND = {"steps": 5, "seq_len": 128, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
          "model.max_position_embeddings": 256, "model.full_attention": {"rope_theta": 5e6}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (d / f"f{i}.py").write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 9)
    return str(d)


def _staged(corpus, **extra):
    return TrainConfig.preset("tiny-cpu").override(
        {**SMALL, "steps": 3, "data.source": corpus, "stages": [EXTEND], **extra})


def test_stage_configs_merge_attention_fields_and_keep_the_rest():
    tc = TrainConfig.preset("tiny-cpu").override(
        {**SMALL, "steps": 3, "model.full_attention": {"rope_theta": 640_000.0, "num_heads": 2},
         "stages": [EXTEND, {"steps": 9, "lr": 1e-4}]})
    s1, s2, s3 = tc.stage_configs()
    assert (s1.steps, s1.seq_len, s1.stages) == (3, 32, ())
    assert s2.model["full_attention"] == {"rope_theta": 5e6, "num_heads": 2}  # merged
    assert (s2.seq_len, s2.batch_size, s2.model_config().max_position_embeddings) == (128, 2, 256)
    assert (s3.steps, s3.seq_len, s3.lr) == (9, 128, 1e-4)  # inherits stage 2
    assert s3.model_config().full_attention.rope_theta == 5e6
    assert s3.model_config().full_attention.num_heads == 2
    assert s1.model_config().sliding_attention.rope_theta == 10_000.0
    assert tc.total_steps == 9
    assert tc.stage_at(0)[0] == 1 and tc.stage_at(3)[0] == 2 and tc.stage_at(8)[0] == 3
    tc.validate(tc.model_config())
    # JSON round trip (run directories and checkpoints store the TrainConfig as a dict)
    assert TrainConfig.from_dict(tc.to_dict()) == tc


@pytest.mark.parametrize("stage, message", [
    ({"steps": 5, "model.num_layers": 3}, "num_layers"),
    ({"steps": 5, "model.full_attention": {"num_kv_heads": 2}}, "full_attention.num_kv_heads"),
    ({"steps": 3}, "not after stage 1"),
    ({"seq_len": 64}, "no 'steps'"),
    ({"steps": 5, "seq_len": 512}, "max_position_embeddings"),
])
def test_bad_stages_are_refused_with_the_cause(stage, message):
    tc = TrainConfig.preset("tiny-cpu").override({**SMALL, "steps": 3, "stages": [stage]})
    with pytest.raises(ValueError, match=message):
        tc.validate(tc.model_config())


def test_stage_changes_names_only_the_stage_fields():
    a = ModelConfig.tiny()
    b = a.replace(full_attention=dataclasses.replace(a.full_attention, rope_theta=6.4e5),
                  max_position_embeddings=8192)
    assert stage_changes(a, b) == {"full_attention.rope_theta": (5e6, 6.4e5),
                                   "max_position_embeddings": (2048, 8192)}
    assert set(stage_changes(a, b)) <= set(STAGE_MODEL_FIELDS)
    with pytest.raises(ValueError, match="hidden_size"):
        stage_changes(a, a.replace(hidden_size=64))


def test_rope_scaling_configs_are_refused_not_misread():
    hf = {"rope_parameters": {
        "full_attention": {"rope_type": "yarn", "rope_theta": 5e6, "factor": 8.0,
                           "original_max_position_embeddings": 32768},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        ModelConfig.from_hf(hf)
    with pytest.raises(ValueError, match="'linear'"):
        ModelConfig.from_hf({"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_two_stage_run_continues_the_checkpoint_with_the_new_rope_base(corpus, tmp_path):
    tc = _staged(corpus)
    s1 = tc.stage_configs()[0]
    # Stage 1 alone, as a run that later gets extended.
    r1 = train(s1, str(tmp_path))
    assert r1.step == 3
    stage1_params = nnx.to_pure_dict(nnx.state(r1.model, nnx.Param))
    # A plain run may not change the RoPE base of a checkpoint...
    plain = s1.override({"steps": 5, "model.full_attention": {"rope_theta": 5e6}})
    with pytest.raises(CheckpointError, match="rope_theta"):
        train(plain, str(tmp_path))
    # ... a declared stage does, resuming at step 3 with a fresh data stream of 128 tokens.
    r2 = train(tc, str(tmp_path))
    assert (r2.start_step, r2.step, len(r2.losses)) == (3, 5, 2)
    assert np.isfinite(r2.losses).all()
    model, meta = load_checkpoint(str(tmp_path))
    assert meta["step"] == 5
    assert meta["model_config"]["full_attention"]["rope_theta"] == 5e6
    assert meta["model_config"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert meta["model_config"]["max_position_embeddings"] == 256
    assert meta["train_config"]["seq_len"] == 128
    assert model.cfg.full_attention.rope_theta == 5e6
    # the extension trained the stage-1 weights (same structure, moved values)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pairs = list(zip(jax.tree.leaves(stage1_params), jax.tree.leaves(after), strict=True))
    assert all(a.shape == b.shape for a, b in pairs)
    assert not all(np.allclose(a, b) for a, b in pairs)
    # Running the finished staged config again is a no-op resume.
    r3 = train(tc, str(tmp_path))
    assert (r3.start_step, r3.step, r3.losses) == (5, 5, [])
    # A later stage that changes a parameter shape is refused before training.
    bad = _staged(corpus, stages=[{**EXTEND, "steps": 7, "model.num_experts": 4}])
    with pytest.raises(ValueError, match="num_experts"):
        train(bad, str(tmp_path))
