"""The MOPD loop: a killed run resumes exactly; metrics and checkpoints are what they say."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mimo_jax.model.mimo import MiMo
from mimo_jax.post_train import MOPDConfig, mopd
from mimo_jax.post_train.checkpoint import save_model
from mimo_jax.post_train.loop import load_model
from tests.test_mopd_rollout import micro_config

TOK = {"kind": "byte"}
TASKS = {"add": {"kind": "mod_add", "modulus": 10},
         "reverse": {"kind": "reverse", "alphabet": "ab", "min_len": 1, "max_len": 3}}


class Killed(Exception):
    pass


def _records(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    for r in recs:
        r.pop("step_time_s", None)
    return recs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mopd_models")
    cfg = micro_config(vocab_size=260)
    paths = {}
    for seed, name in enumerate(["student", "add", "reverse"]):
        paths[name] = str(root / name)
        save_model(paths[name], MiMo(cfg, rngs=nnx.Rngs(seed)), TOK)
    return paths


@pytest.mark.slow  # ~2 min on 2 cores; `bash tools/test.sh --slow`
def test_killed_run_resumes_exactly(checkpoints, tmp_path):
    cfg = MOPDConfig(student=checkpoints["student"],
                     teachers={"add": checkpoints["add"], "reverse": checkpoints["reverse"]},
                     tasks=TASKS, steps=4, prompts_per_step=2, samples_per_prompt=2,
                     max_new_tokens=4, lr=1e-2, eval_every=0, save_every=2, tensorboard=False,
                     minibatches=2)
    full = mopd(cfg, str(tmp_path / "full"))
    assert (full.start_step, full.step) == (0, 4)

    def kill(step, rec):
        if step == 3:  # after an unsaved step: the resumed run must redo it
            raise Killed

    with pytest.raises(Killed):
        mopd(cfg, str(tmp_path / "killed"), on_step=kill)
    resumed = mopd(cfg, str(tmp_path / "killed"))
    assert (resumed.start_step, resumed.step) == (2, 4)

    a, b = nnx.state(full.model), nnx.state(resumed.model)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The student moved, and the saved checkpoint is the returned model.
    start = nnx.state(load_model(checkpoints["student"])[0])
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(a), strict=True))
    saved, meta = load_model(str(tmp_path / "full"))
    for x, y in zip(jax.tree.leaves(nnx.state(saved)), jax.tree.leaves(a), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert meta["step"] == 4 and meta["tokenizer"] == TOK

    # The killed run's unsaved step was dropped from its metrics and redone identically.
    recs = _records(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs == _records(tmp_path / "full" / "metrics.jsonl")
    for key in ("loss", "reward_add", "reward_reverse", "reverse_kl_add", "reverse_kl_reverse",
                "icepop_drop_rate", "replay_mismatch_rate", "grad_norm"):
        assert np.isfinite(recs[-1][key]), key
    # The first minibatch of a batch sees the sampler's weights (replay reproduces mu), the
    # second weights one update later (lr 1e-2: visibly off-policy).
    assert 0 < recs[0]["rollout_logp_abs_diff"]


def test_config_errors_name_the_cause(checkpoints):
    base = dict(student=checkpoints["student"], teachers={"add": checkpoints["add"]},
                tasks={"add": TASKS["add"]})
    with pytest.raises(ValueError, match="same domains"):
        MOPDConfig(**{**base, "tasks": TASKS}).validate()
    with pytest.raises(ValueError, match="eps_low"):
        MOPDConfig(**base, eps_low=2.0).validate()
    with pytest.raises(ValueError, match="unknown MOPD config keys"):
        MOPDConfig.from_dict({"studnet": "x"})


def test_cli_resolves_a_yaml_config(checkpoints, tmp_path, capsys):
    from mimo_jax import cli

    cfg = tmp_path / "mopd.yaml"
    cfg.write_text("student: s\nteachers: {add: t}\ntasks: {add: {kind: mod_add}}\nsteps: 3\n")
    assert cli.main(["mopd", "--config", str(cfg), "--workdir", str(tmp_path / "w"),
                     "--set", "lr=0.5", "--steps", "7", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["student"] == str(tmp_path / "s") and out["teachers"] == {"add": str(tmp_path / "t")}
    assert out["lr"] == 0.5 and out["steps"] == 7
    # A missing student checkpoint is a clear error, not a traceback.
    assert cli.main(["mopd", "--config", str(cfg), "--workdir", str(tmp_path / "w")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_tasks_split_and_score():
    from mimo_jax.post_train.tasks import make_task

    rng = np.random.default_rng(0)
    add3 = make_task({"kind": "mod_add", "modulus": 100, "max_operand": 10, "terms": 3})
    p, a = add3.sample(rng, "train")
    terms = [int(x) for x in p[:-1].split("+")]
    assert len(terms) == 3 and all(0 <= x < 10 for x in terms) and a == str(sum(terms))
    assert add3.reward(p, a) == 1.0 and add3.reward(p, a + "0") == 0.0
    two = make_task({"kind": "mod_add", "modulus": 10, "max_operand": 100})
    assert two.answer("72+63=") == "5"
    # The default task draws what it always drew (two operands below the modulus).
    old = make_task({"kind": "mod_add"})
    assert old.sample(np.random.default_rng(3), "train")[0].count("+") == 1
    train = {add3.sample(rng, "train")[0] for _ in range(300)}
    assert not train & {q for q, _ in add3.heldout(100)}
    with pytest.raises(ValueError, match="terms"):
        make_task({"kind": "mod_add", "terms": 1})


def test_end_lr_decays_to_it_by_the_last_step():
    from mimo_jax.train.optimizer import lr_schedule

    const = lr_schedule(MOPDConfig(steps=50, lr=1e-3, warmup_steps=5).optimizer_config())
    assert float(const(49)) == pytest.approx(1e-3)
    cos = lr_schedule(MOPDConfig(steps=50, lr=1e-3, end_lr=1e-5, warmup_steps=5)
                      .optimizer_config())
    assert float(cos(5)) == pytest.approx(1e-3)
    assert float(cos(50)) == pytest.approx(1e-5, rel=1e-3)
    assert 1e-5 < float(cos(27)) < 1e-3
