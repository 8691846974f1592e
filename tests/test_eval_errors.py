"""Bad input to the evaluation: clear errors (or lm-eval's documented behaviour)."""

from __future__ import annotations

import pytest
from eval_fixtures import checkpoint_dir, save_tokenizer, train_tokenizer
from lm_eval.api.instance import Instance

from mimo_jax.cli import main
from mimo_jax.eval.harness import UnknownTaskError, task_manager
from mimo_jax.eval.lm_backend import MimoLM
from mimo_jax.eval.tokenizer import resolve_tokenizer


@pytest.fixture(scope="module")
def lm() -> MimoLM:
    return MimoLM(pretrained=checkpoint_dir(), max_length=32, batch_size=2, progress=False)


def test_empty_continuation(lm):
    req = Instance("loglikelihood", {}, ("The cat", ""), 0, metadata=("my_task", 3, 1))
    with pytest.raises(ValueError, match=r"\(task my_task, doc 3\) has an empty continuation"):
        lm.loglikelihood([req])


def test_context_longer_than_max_length_is_left_truncated(lm):
    """lm-eval's hf rule: the score of a context truncated to fit equals the score after just
    the tokens that fit."""
    long_ctx = ("Red blue green. " * 40).strip()
    ctx_ids = lm.tok_encode(long_ctx)
    cont_ids = lm.tok_encode(long_ctx + " apple")[len(ctx_ids):]
    assert len(ctx_ids) > 100 and cont_ids
    (full,) = lm.loglikelihood([Instance("loglikelihood", {}, (long_ctx, " apple"), 0)])
    kept = (ctx_ids + cont_ids)[-(32 + 1):-len(cont_ids)]  # what fits: 33 tokens in all
    (short,) = lm._loglikelihood_tokens([(None, kept, cont_ids)])
    (shorter,) = lm._loglikelihood_tokens([(None, kept[1:], cont_ids)])
    assert full[0] == pytest.approx(short[0], rel=1e-5) and full[1] == short[1]
    assert full[0] != pytest.approx(shorter[0], rel=1e-5)  # the test can tell


def test_continuation_longer_than_max_length(lm):
    req = Instance("loglikelihood", {}, ("A", " " + "stone river " * 30), 0)
    with pytest.raises(ValueError, match="more than max_length=32"):
        lm.loglikelihood([req])


def test_generation_budget_must_leave_room_for_the_context(lm):
    req = Instance("generate_until", {}, ("The cat", {"until": ["."], "max_gen_toks": 32}), 0)
    with pytest.raises(ValueError, match="max_gen_toks=32 leaves no room"):
        lm.generate_until([req])


def test_unknown_task():
    with pytest.raises(UnknownTaskError, match="unknown task.*'mimo_arith_mx'.*mimo_arith_mc"):
        task_manager(["mimo_arith_mx"])
    with pytest.raises(UnknownTaskError, match="does not exist"):
        task_manager(["/nonexistent/task.yaml"])


def test_cli_unknown_task_fails_before_loading(capsys):
    code = main(["eval", "--checkpoint", "/nonexistent", "--tasks", "no_such_task_xyz"])
    assert code == 2
    assert "unknown task(s): 'no_such_task_xyz'" in capsys.readouterr().err


def test_cli_needs_something_to_do(capsys):
    assert main(["eval", "--checkpoint", checkpoint_dir()]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_tokenizer_larger_than_the_model(tmp_path):
    save_tokenizer(train_tokenizer(vocab_size=400), str(tmp_path))
    with pytest.raises(ValueError, match="has 400 ids but the model vocabulary is 320"):
        MimoLM(pretrained=checkpoint_dir(), tokenizer=str(tmp_path), progress=False)


def test_missing_tokenizer_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found.*tokenizer=PATH"):
        resolve_tokenizer(str(tmp_path))
    with pytest.raises(TypeError, match=r"unknown model argument\(s\) \['max_lenght'\]"):
        MimoLM(pretrained=checkpoint_dir(), max_lenght=64)
    with pytest.raises(ValueError, match="batch_size must be an integer or 'auto'"):
        MimoLM(pretrained=checkpoint_dir(), batch_size="big")
    with pytest.raises(ValueError, match="speculative=4 needs that many MTP heads"):
        MimoLM(pretrained=checkpoint_dir(), speculative=4)
