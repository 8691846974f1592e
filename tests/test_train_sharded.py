"""Training on a mesh of 8 simulated devices: same losses as one device, sharded resume."""

from __future__ import annotations

import jax
import numpy as np
from test_train_resume import SMALL, tiny_corpus

from mimo_jax.train import TrainConfig, train


def test_sharded_training_matches_one_device(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", 40)
    base = TrainConfig.preset("tiny-cpu").override(
        [*SMALL, f"data.source={corpus}", "batch_size=8", "steps=3", "tensorboard=false",
         "save_every=1000"])
    single = train(base, str(tmp_path / "one"))
    mesh = "data=2,fsdp=2,expert=2"
    sharded = train(base.override({"mesh": mesh}), str(tmp_path / "mesh"))
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-4)
    embed = sharded.model.embed[...]
    assert len(embed.sharding.device_set) == 8
    assert embed.sharding.spec == jax.P("tensor", "fsdp")
    # Resume on the mesh from the saved step 3 and continue to step 4 like one device does.
    more = train(base.override({"mesh": mesh, "steps": 4}), str(tmp_path / "mesh"))
    assert more.start_step == 3
    single_more = train(base.override({"steps": 4}), str(tmp_path / "one"))
    np.testing.assert_allclose(more.losses, single_more.losses, rtol=2e-4)
