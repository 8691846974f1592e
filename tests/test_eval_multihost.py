"""Two real JAX processes on CPU (gloo collectives, 2 devices each, one data x fsdp mesh over
both): process 0 scores requests and broadcasts every batch, process 1 follows; the scores
equal a single-process run. Slow (two interpreters start, compile and talk over TCP)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMo
from mimo_jax.eval.packing import Packing, Scorer, ScoreRequest

WORKER = r'''
import json, os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
from test_eval_packing import CFG
from test_eval_multihost import requests
from mimo_jax import sharding as sh
from mimo_jax.eval.multihost import BatchBroadcast, follow
from mimo_jax.eval.packing import Packing, Scorer
from mimo_jax.parallel import create_sharded
mesh, rules = sh.make_mesh("data=2,fsdp=2"), sh.ShardingRules.preset()
model = create_sharded(CFG, mesh, rules, seed=0)
scorer = Scorer(model, Packing((32, 64), batch_size=2), mesh=mesh, rules=rules,
                channel=BatchBroadcast() if pid == 0 else None)
if pid == 0:
    out = scorer.score(requests())
    scorer.channel.stop()
    print(json.dumps({"scores": out, "batches": scorer.stats.batches}))
else:
    print(json.dumps({"batches": follow(scorer)}))
'''


def requests() -> list[ScoreRequest]:
    rng = np.random.default_rng(0)
    return [ScoreRequest(tuple(rng.integers(0, 96, int(n)).tolist()), (5, 6))
            for n in rng.integers(3, 64, 10)]


@pytest.mark.slow
def test_two_processes_leader_and_follower(tmp_path):
    from test_eval_packing import CFG

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (1, 0)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    follower, leader = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert leader["batches"] == follower["batches"] >= 2
    want = Scorer(MiMo(CFG, rngs=nnx.Rngs(0)), Packing((32, 64), batch_size=2)).score(requests())
    np.testing.assert_allclose([s[0] for s in leader["scores"]], [w[0] for w in want],
                               rtol=2e-5)
    assert [s[1] for s in leader["scores"]] == [w[1] for w in want]
