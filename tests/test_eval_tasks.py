"""Offline tasks through lm-eval with the `mimo-jax` model: the shipped group, a YAML task on
a local parquet copy (what docs/eval.md tells users to do with e.g. hellaswag), the model
registered by name, the result files, and the `mimo-jax eval` command with our own evals."""

from __future__ import annotations

import json
import os

import lm_eval
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixtures import checkpoint_dir

import mimo_jax.eval  # noqa: F401  (registers "mimo-jax")
from mimo_jax.cli import main
from mimo_jax.eval.harness import run_tasks, write_results
from mimo_jax.eval.lm_backend import MimoLM
from mimo_jax.eval.tasks import TASKS_DIR
from mimo_jax.eval.tasks.offline_data import arithmetic_choice, copy_words, text_documents


@pytest.fixture(scope="module")
def lm() -> MimoLM:
    return MimoLM(pretrained=checkpoint_dir(), max_length=64, progress=False)


def test_offline_datasets_are_deterministic():
    a, b = arithmetic_choice(), arithmetic_choice(pretrained="ignored")
    assert a["test"].to_list() == b["test"].to_list() and len(a["test"]) == 100
    q = a["test"][0]
    x, y = (int(w) for w in q["question"].removeprefix("What is ").rstrip("?").split(" plus "))
    assert q["choices"][q["label"]] == str(x + y) and len(set(q["choices"])) == 4
    assert len(text_documents()["test"]) >= 10 and len(copy_words()["train"]) == 10
    assert os.path.isfile(os.path.join(TASKS_DIR, "texts.jsonl"))


def test_shipped_group_runs_offline(lm, tmp_path):
    results = run_tasks(lm, ["mimo_offline"], limit=4, bootstrap_iters=0, log_samples=True)
    res = results["results"]
    assert set(res) >= {"mimo_arith_mc", "mimo_text_ppl", "mimo_copy_words"}
    assert 0.0 <= res["mimo_arith_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["mimo_copy_words"]["exact_match,none"] <= 1.0
    assert res["mimo_text_ppl"]["bits_per_byte,none"] > 0
    stats = results["mimo_jax"]["scoring"]
    assert stats["compilations"] >= 1 and 0.0 <= stats["padding_fraction"] < 1.0
    # arith (4 choices x 4 docs) and the rolling windows were scored; copy_words generated
    assert stats["requests"] >= 16 and results["mimo_jax"]["generation"]["requests"] == 4
    paths = write_results(results, str(tmp_path), extra={"passkey retrieval": [
        {"length": 64, "depth": 0.5, "accuracy": 0.0}]})
    data = json.loads(open(paths["json"]).read())
    assert data["results"]["mimo_arith_mc"]["acc,none"] == res["mimo_arith_mc"]["acc,none"]
    assert data["evals"]["passkey retrieval"][0]["length"] == 64
    text = open(paths["markdown"]).read()
    assert "mimo_arith_mc" in text and "padding" in text and "passkey retrieval" in text
    assert os.path.isfile(tmp_path / "samples_mimo_arith_mc.jsonl")


def test_local_parquet_copy_of_a_standard_task(lm, tmp_path):
    """docs/eval.md's recipe: lm-eval's own hellaswag config, included, reading a local
    parquet file in the hub's schema instead of the hub."""
    rows = [{"ind": i, "activity_label": "Washing dishes", "ctx_a": f"A man is {verb} plates.",
             "ctx_b": "he", "ctx": "", "endings": ["dries them.", "eats them.",
                                                    "throws them [title] away.", "sings."],
             "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)}
            for i, verb in enumerate(["washing", "drying", "stacking"])]
    data = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    builtin = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag",
                           "hellaswag.yaml")
    task = tmp_path / "hellaswag_local.yaml"
    task.write_text(f"""include: {builtin}
task: hellaswag_local
dataset_path: parquet
dataset_name: null
training_split: null
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {tmp_path / "hf-cache"}
""")
    before = lm.scorer.stats.requests
    res = run_tasks(lm, [str(task)], bootstrap_iters=0)["results"]["hellaswag_local"]
    assert res["sample_len"] == 3 and 0.0 <= res["acc_norm,none"] <= 1.0
    assert lm.scorer.stats.requests - before == 12  # 3 documents x 4 endings


def test_model_registered_by_name(tmp_path):
    """What lm-eval users type: the model by name and an argument string."""
    results = lm_eval.simple_evaluate(
        model="mimo-jax",
        model_args=f"pretrained={checkpoint_dir()},max_length=64,batch_size=4,progress=False",
        tasks=["mimo_arith_mc"], limit=2, bootstrap_iters=0,
        task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR, include_defaults=False))
    assert "acc,none" in results["results"]["mimo_arith_mc"]
    assert results["config"]["model_num_parameters"] > 0


def test_cli_tasks_passkey_and_corpus_evals(tmp_path, capsys):
    corpus_file = tmp_path / "docs.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": f"The cat {i} sat on the mat. " * 4})
                                   + "\n" for i in range(6)))
    out = tmp_path / "out"
    code = main(["--quiet", "eval", "--checkpoint", checkpoint_dir(), "--tasks",
                 "mimo_arith_mc,mimo_text_ppl", "--limit", "2", "--max-length", "320",
                 "--buckets", "64:256", "--bootstrap-iters", "0", "--output", str(out),
                 "--passkey", "320",
                 "--passkey-trials", "1", "--perplexity", str(corpus_file),
                 "--mtp-acceptance", str(corpus_file), "--seq-len", "32", "--max-rows", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mimo_arith_mc" in printed and "passkey retrieval" in printed
    data = json.loads((out / "results.json").read_text())
    assert {"mimo_arith_mc", "mimo_text_ppl"} <= set(data["results"])
    assert [r["length"] for r in data["evals"]["passkey retrieval"]] == [320] * 5
    assert data["evals"]["perplexity"]["tokens"] > 0
    assert data["evals"]["MTP acceptance"]["num_heads"] == 1
    assert (out / "results.md").read_text().startswith("## lm-eval tasks")
