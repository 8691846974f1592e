"""The demo: its BPE tokenizer (trained on training files only, reused on a rerun), a short
end-to-end run in a temporary workdir (summary table, tokenizer.json, checkpoint, resume),
and `mimo-jax generate` finding the workdir's tokenizer."""

from __future__ import annotations

import os
import sysconfig

import pytest

from mimo_jax.commands.demo import (
    PROMPTS,
    planned_steps,
    prepare_tokenizer,
    schedule,
    summary_table,
)
from mimo_jax.data.pipeline import split_documents
from mimo_jax.data.sources import open_source
from mimo_jax.data.tokenizer import load_tokenizer
from mimo_jax.train import TrainConfig

STDLIB_FILES = ("textwrap.py", "string.py", "fnmatch.py", "bisect.py", "heapq.py", "glob.py",
                "shlex.py", "colorsys.py", "keyword.py", "copy.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A few real stdlib files (a small corpus the tests can train on quickly)."""
    root = sysconfig.get_paths()["stdlib"]
    d = tmp_path_factory.mktemp("corpus")
    for name in STDLIB_FILES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            (d / name).write_text(f.read(), encoding="utf-8")
    return str(d)


def test_tokenizer_is_trained_on_training_files_then_reused(tmp_path, corpus):
    data = TrainConfig().override({"data.source": corpus, "data.val_fraction": 0.2}).data
    info = prepare_tokenizer(str(tmp_path), data, vocab_size=400, max_mb=1.0)
    path = tmp_path / "tokenizer.json"
    assert path.is_file() and info["spec"]["path"] == str(path)
    assert info["trained"] is not None and info["bytes_per_token"] > 1.5
    docs = open_source(corpus)
    split = split_documents(len(docs), 0.2, 0)
    assert info["documents"] == len(split.train)  # held-out files never seen
    tok = load_tokenizer(info["spec"])
    assert tok.vocab_size == 400 and tok.bos_id is not None and tok.eos_id is not None
    again = prepare_tokenizer(str(tmp_path), data, vocab_size=999, max_mb=1.0)
    assert again["trained"] is None and again["spec"] == info["spec"]


def test_schedule_decays_to_the_end_of_the_time_budget():
    tc = TrainConfig.preset("tiny-cpu")
    planned = planned_steps(tc, 4.0)
    assert planned > planned_steps(tc, 2.0) > 0
    fresh = tc.override(schedule(tc, 4.0, start=0))
    fresh.validate(fresh.model_config())
    assert fresh.steps == planned and fresh.warmup_steps + fresh.decay_steps == planned
    assert fresh.time_limit_minutes == 4.0
    again = tc.override(schedule(tc, 4.0, start=500))  # a rerun: a new decay from step 500
    assert (again.steps, again.decay_steps) == (500 + planned, planned)
    assert schedule(tc, 0, start=500) == {"steps": 500}  # --minutes 0: no training
    fixed = schedule(tc, 60, start=0, steps=450)
    assert (fixed["steps"], fixed["decay_steps"]) == (450, 420)


def test_prompts_end_at_a_non_space():
    """A trailing newline would be a token the BPE training text never has before an indented
    line (it merges "\n" with the indentation)."""
    assert all(p == p.rstrip() for p in PROMPTS)


def test_summary_table_aligns_two_columns():
    table = summary_table([("steps", "12"), ("bits per byte", "2.5")]).splitlines()
    assert table[0] == table[-1] and set(table[0]) == {"-"}
    assert table[1] == "steps          12" and table[2] == "bits per byte  2.5"


def test_demo_end_to_end_and_resume(tmp_path, corpus, capsys):
    """A tiny model for a moment: every stage runs and the summary prints; a rerun reuses
    the tokenizer and resumes from the checkpoint; generate finds tokenizer.json."""
    from mimo_jax import cli
    from mimo_jax.commands.generate import resolve_tokenizer

    workdir = str(tmp_path / "demo")
    args = ["demo", "--workdir", workdir, "--vocab-size", "320", "--sample-tokens", "6",
            "--speculative", "1", "--eval-rows", "4", "--prompt", "def f(x):",
            "--set", f"data.source={corpus}", "--set", "data.val_fraction=0.2",
            "--set", "seq_len=32", "--set", "batch_size=4", "--set", "model.num_layers=2",
            "--set", "model.num_mtp_layers=1", "--set", "data.val_batches=1",
            "--set", "save_every=1000"]
    assert cli.main([*args, "--minutes", "0.01"]) == 0
    out = capsys.readouterr()
    assert "tokenizer: byte-level BPE, 320 ids" in out.err
    assert "--- prompt 1/1, greedy ---\ndef f(x):" in out.out
    summary = out.out[out.out.index("summary\n"):]
    for row in ("steps", "tokens seen", "train loss", "validation loss", "held-out perplexity",
                "bits per byte", "MTP acceptance length", "decode tokens/s", "checkpoint"):
        assert f"\n{row}  " in summary or f"\n{row} " in summary, row
    assert "K=1: " in summary and "MTP K=1 " in summary
    assert os.path.isfile(os.path.join(workdir, "tokenizer.json"))
    steps = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert steps and int(max(steps, key=int)) >= 1

    assert cli.main([*args, "--minutes", "0"]) == 0  # no training: resume, evaluate, sample
    out = capsys.readouterr()
    assert "tokenizer: reusing" in out.err and "resuming from step" in out.err

    tok = resolve_tokenizer(workdir)
    assert tok.spec["path"] == os.path.join(workdir, "tokenizer.json") and tok.vocab_size == 320
    moved = str(tmp_path / "moved")
    os.rename(workdir, moved)  # the recorded absolute path is gone: the workdir's copy is used
    assert resolve_tokenizer(moved).spec["path"] == os.path.join(moved, "tokenizer.json")
