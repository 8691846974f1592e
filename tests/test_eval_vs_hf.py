"""The `mimo-jax` lm-eval model against lm-eval's own `hf` backend (transformers 5.23) on the
same small random checkpoint and BPE tokenizer (tests/eval_fixtures.py), float32: log-probs
within 1e-4 relative, is-greedy flags and generated strings identical, with contexts longer
than max_length (left truncation), empty contexts and multi-window documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_fixtures import checkpoint_dir, corpus
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from mimo_jax.eval.lm_backend import MimoLM

MAX_LEN = 48  # short, so that long contexts are truncated and documents span windows


@pytest.fixture(scope="module")
def ours() -> MimoLM:
    return MimoLM(pretrained=checkpoint_dir(), max_length=MAX_LEN, batch_size=4,
                  progress=False)


@pytest.fixture(scope="module")
def hf() -> HFLM:
    return HFLM(pretrained=checkpoint_dir(), max_length=MAX_LEN, batch_size=8, device="cpu",
                dtype="float32")


def _close(a: list[float], b: list[float]) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


def test_tokenisation_is_the_same(ours, hf):
    texts = ["", "The cat sat.", " leading space", "Two  spaces\nand a newline"]
    texts += [hf.tokenizer.decode([hf.prefix_token_id]) + "after the prefix token"]
    for t in texts:
        assert ours.tok_encode(t) == hf.tok_encode(t), t
    assert ours.prefix_token_id == hf.prefix_token_id
    assert ours.eot_token_id == hf.eot_token_id
    ids = ours.tok_encode("Seven green birds")
    assert ours.tok_decode(ids) == hf.tok_decode(ids)


def _loglikelihood_requests() -> list[Instance]:
    texts = corpus(60, seed=7)
    out = []
    for i in range(24):
        context = " ".join(texts[i: i + 1 + (i % 5) * 3])  # up to ~150 tokens: truncated
        words = texts[30 + i].lower().split()
        continuation = " " + " ".join(words[: 1 + i % 4])
        if i % 6 == 0:
            context += " "  # trailing space moves into the continuation (TemplateLM)
            continuation = continuation.lstrip()
        out.append(Instance("loglikelihood", {}, (context, continuation), i))
    out.append(Instance("loglikelihood", {}, ("", "The cat sat on a mat."), 98))  # empty ctx
    out.append(Instance("loglikelihood", {}, ("Red", " " + " ".join(texts[:2])), 99))  # long
    return out


def test_loglikelihood_matches_hf(ours, hf):
    reqs = _loglikelihood_requests()
    got, want = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    _close([g[0] for g in got], [w[0] for w in want])
    assert [g[1] for g in got] == [w[1] for w in want]
    stats = ours.scorer.stats
    assert set(stats.compilations_by_bucket) <= set(ours.scorer.packing.buckets)


def test_greedy_continuations_are_greedy_in_both(ours, hf):
    """Token-level requests whose continuation is the model's own greedy output: is-greedy
    True in both backends; one token changed: False in both."""
    contexts = [ours.tok_encode(t) for t in corpus(6, seed=3)]
    greedy = []
    with torch.no_grad():  # the reference model's own greedy tokens, one at a time
        for ctx in contexts:
            ids = list(ctx)
            for _ in range(5):
                ids.append(int(hf.model(torch.tensor([ids])).logits[0, -1].argmax()))
            greedy.append(ids[len(ctx):])
    reqs = []
    for ctx, cont in zip(contexts, greedy, strict=True):
        reqs.append((None, ctx, list(cont)))
        reqs.append((None, ctx, [*cont[:-1], (cont[-1] + 1) % 300]))
    got = ours._loglikelihood_tokens(reqs)
    want = hf._loglikelihood_tokens(reqs)
    _close([g[0] for g in got], [w[0] for w in want])
    assert [g[1] for g in got] == [w[1] for w in want] == [True, False] * len(contexts)


def test_loglikelihood_rolling_matches_hf(ours, hf):
    texts = corpus(40, seed=11)
    docs = ["", texts[0], " ".join(texts[1:4]), " ".join(texts[4:20])]  # 0, 1, 2, many windows
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    got, want = ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)
    assert got[0] == want[0] == 0.0
    _close(got, want)


def _generation_requests() -> list[Instance]:
    texts = corpus(12, seed=5)
    out = []
    for i in range(6):
        kwargs = {"until": [".", "?"] if i % 2 else ["the"], "max_gen_toks": 10 + 4 * (i % 2)}
        context = texts[i] if i != 5 else " ".join(texts)  # the last is left-truncated
        out.append(Instance("generate_until", {}, (context, kwargs), i))
    return out


def test_greedy_generate_until_matches_hf(ours, hf):
    reqs = _generation_requests()
    got = ours.generate_until(reqs)
    hf.batch_size_per_gpu = 1  # hf left-pads batches, shifting positions; one at a time
    try:
        want = hf.generate_until(reqs)
    finally:
        hf.batch_size_per_gpu = 8
    assert got == want
    assert any(got) and ours.generation.requests >= len(reqs)


@pytest.mark.slow  # the speculative decode loop takes long to compile; inference tests cover it
def test_speculative_generation_is_exact(ours):
    """Greedy with K=1 MTP drafts (verified by the main model) gives the same strings."""
    spec = MimoLM(pretrained=ours.model, tokenizer=ours.eval_tokenizer, max_length=MAX_LEN,
                  batch_size=4, speculative=1, progress=False)
    reqs = _generation_requests()[:3]
    assert spec.generate_until(reqs) == ours.generate_until(reqs)
    assert spec.generation.acceptance_lengths  # speculation ran


def test_sampling_follows_the_seed(ours):
    reqs = [Instance("generate_until", {}, (t, {"until": ["\n"], "max_gen_toks": 8,
                                                "do_sample": True, "temperature": 1.0}), i)
            for i, t in enumerate(corpus(3, seed=2))]

    def run(seed: int) -> list[str]:
        lm = MimoLM(pretrained=ours.model, tokenizer=ours.eval_tokenizer, max_length=MAX_LEN,
                    batch_size=4, seed=seed, progress=False)
        return lm.generate_until(reqs)

    first = run(1)
    assert first == run(1)
    assert first != run(2)


@pytest.fixture(scope="module")
def on_mesh() -> MimoLM:
    """The backend on 8 simulated devices (tests/conftest.py): parameters loaded into their
    shards, batch rows split over data x fsdp x expert."""
    return MimoLM(pretrained=checkpoint_dir(), max_length=MAX_LEN, batch_size=4,
                  mesh="data=2,fsdp=2,expert=2", progress=False)


def test_mesh_loglikelihood_equals_one_device(ours, on_mesh):
    reqs = _loglikelihood_requests()[:12]
    got, want = on_mesh.loglikelihood(reqs), ours.loglikelihood(reqs)
    _close([g[0] for g in got], [w[0] for w in want])
    assert [g[1] for g in got] == [w[1] for w in want]
    assert on_mesh.scorer.packing.row_multiple == 8


@pytest.mark.slow  # generation programs compile slowly on the simulated mesh
def test_mesh_generation_equals_one_device(ours, on_mesh):
    reqs = _generation_requests()[:3]
    assert on_mesh.generate_until(reqs) == ours.generate_until(reqs)
