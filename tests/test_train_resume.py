"""Exact resume after SIGKILL, SIGTERM saves, checkpoint layout, and bad input (CLI runs)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from mimo_jax import ModelConfig
from mimo_jax.core.errors import CheckpointError
from mimo_jax.data import DataError
from mimo_jax.train import TrainConfig, load_checkpoint, train

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.intermediate_size=64",
         "model.moe_intermediate_size=16", "model.vocab_size=260", "seq_len=32", "batch_size=4",
         "data.val_batches=1", "val_every=1000", "save_every=3", "progress_bar=false",
         "console_every=1000", "lr=1e-2"]


def tiny_corpus(directory, n_files: int) -> str:
    """`n_files` small Python files in `directory` (created): a corpus for short runs."""
    directory.mkdir()
    for i in range(n_files):
        (directory / f"m{i}.py").write_text(f"def f_{i}(x):\n    return x + {i}\n" * 4)
    return str(directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (d / f"f{i}.py").write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 3)
    return str(d)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # A shared persistent compilation cache: later runs reuse the first run's executable.
    cache = tmp_path_factory.mktemp("xla_cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_PLATFORMS": "cpu"}


def _cmd(workdir, corpus, steps, *extra):
    args = [sys.executable, "-m", "mimo_jax.commands.train", "--preset", "tiny-cpu",
            "--workdir", str(workdir), "--steps", str(steps), "--set", f"data.source={corpus}"]
    for s in (*SMALL, *extra):
        args += ["--set", s]
    return args


def _metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.endswith("\n")]
    return [r for r in lines if r.get("split") != "val"]


def _saved_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _run_until(cmd, env, workdir, min_step, sig, *, after_save=False):
    """Start cmd; send `sig` once step >= min_step is logged (and, with after_save, once a
    finished checkpoint exists and a later step has been logged)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        steps = [r["step"] for r in _metrics(workdir)]
        saved = _saved_steps(workdir) if after_save else [0]
        if steps and max(steps) >= min_step and saved and max(steps) > saved[-1]:
            p.send_signal(sig)
            break
        time.sleep(0.02)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


def _tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_exact_resume_after_sigkill_and_checkpoint_layout(tmp_path, corpus, env):
    n = 20
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(_cmd(straight, corpus, n), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rc, out = _run_until(_cmd(killed, corpus, n), env, killed, 4, signal.SIGKILL,
                         after_save=True)
    assert rc == -signal.SIGKILL, out
    assert 0 < _saved_steps(killed)[-1] < n
    r2 = subprocess.run(_cmd(killed, corpus, n), env=env, capture_output=True, text=True)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "resuming from step" in r2.stdout + r2.stderr
    want = {m["step"]: m["loss"] for m in _metrics(straight)}
    got = {m["step"]: m["loss"] for m in _metrics(killed)}  # re-done steps: last entry wins
    assert sorted(want) == sorted(got) == list(range(1, n + 1))
    assert want == got
    losses = [want[i] for i in range(1, n + 1)]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5  # it learns
    m_a, meta_a = load_checkpoint(str(straight))
    m_b, meta_b = load_checkpoint(str(killed))
    assert meta_a["step"] == meta_b["step"] == n
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(m_a)),
                                nnx.to_flat_state(nnx.state(m_b)), strict=True):
        assert pa == pb and np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), pa
    # Layout: checkpoints/<step>/{params, meta, opt_state, data, rng}; meta as agreed.
    step_dir = straight / "checkpoints" / str(n)
    assert {"params", "meta", "opt_state", "data", "rng"} <= set(os.listdir(step_dir))
    assert set(meta_a) >= {"config", "tokenizer", "train_config", "step"}
    assert meta_a["tokenizer"] == {"kind": "byte"}
    cfg = ModelConfig.from_hf(meta_a["config"])
    assert cfg.hidden_size == 32 and cfg.num_mtp_layers == 3
    rec = _metrics(straight)[-1]
    for key in ("loss", "ce", "mtp_ce", "balance_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                "expert_load_imbalance", "grad_num_zeros"):
        assert key in rec, key
    assert len(rec["mtp_ce"]) == 3
    assert os.listdir(straight / "tensorboard")


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resumes(tmp_path, corpus, env):
    wd = tmp_path / "run"
    rc, out = _run_until(_cmd(wd, corpus, 10_000, "save_every=1000"), env, wd, 3, signal.SIGTERM)
    assert rc == 0, out
    last = _metrics(wd)[-1]["step"]
    assert f"saving step {last}" in out
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())[-1] == last
    r = subprocess.run(_cmd(wd, corpus, last + 2, "save_every=1000"), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and f"resuming from step {last}" in r.stdout + r.stderr
    assert _metrics(wd)[-1]["step"] == last + 2

    # An incompatible or corrupt checkpoint: a clear error, and nothing in DIR is lost.
    before = _tree_digest(wd / "checkpoints")
    bad = subprocess.run(_cmd(wd, corpus, last + 4, "model.hidden_size=48"), env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "different model config" in bad.stderr
    assert "hidden_size" in bad.stderr
    assert _tree_digest(wd / "checkpoints") == before
    params_dir = wd / "checkpoints" / str(last + 2) / "params"
    for root, _, files in os.walk(params_dir):
        for f in files:
            if not f.startswith("_"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.write(b"\x00garbage" * 8)
    before = _tree_digest(wd / "checkpoints")
    bad = subprocess.run(_cmd(wd, corpus, last + 4), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot restore checkpoint" in bad.stderr, bad.stderr
    assert _tree_digest(wd / "checkpoints") == before


def test_bad_config_and_corpus_fail_before_training(tmp_path, corpus):
    tc = TrainConfig.preset("tiny-cpu").override([*SMALL, f"data.source={corpus}"])
    with pytest.raises(ValueError, match="above the model's maximum"):
        train(tc.override({"seq_len": 4096}), str(tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no data files"):
        train(tc.override({"data.source": str(empty)}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown setting 'lr_peak'"):
        tc.override(["lr_peak=1"])
    meta = tmp_path / "c" / "checkpoints" / "5"
    meta.mkdir(parents=True)
    (meta / "_CHECKPOINT_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError):
        train(tc, str(tmp_path / "c"))
    assert os.path.exists(meta / "_CHECKPOINT_METADATA")


@pytest.mark.slow
def test_loss_falls_on_tiny_preset_within_a_few_dozen_steps(tmp_path):
    tc = TrainConfig.preset("tiny-cpu").override(
        ["steps=40", "progress_bar=false", "tensorboard=false", "save_every=1000",
         "val_every=1000"])
    result = train(tc, str(tmp_path))
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < first - 1.5, (first, last)
    assert result.val_perplexity is not None and result.val_perplexity < 40
