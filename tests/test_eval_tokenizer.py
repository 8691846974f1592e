"""EvalTokenizer: the same ids as transformers' fast tokenizer (lm-eval's hf backend uses it)
with and without a BOS template, special tokens skipped on decode, training specs."""

from __future__ import annotations

import json
import os

import pytest
from eval_fixtures import EOS, corpus, save_tokenizer, train_tokenizer
from transformers import AutoTokenizer

from mimo_jax.eval.tokenizer import hf_tokenizer, resolve_tokenizer, spec_tokenizer

TEXTS = ["", "The cat sat on a mat.", " leading", "Seven  green\nbirds!", "naïve café ☕"]


@pytest.mark.parametrize("bos", [None, "<|bos|>"])
def test_same_ids_as_transformers(tmp_path, bos):
    save_tokenizer(train_tokenizer(bos=bos), str(tmp_path), bos=bos)
    ours, theirs = hf_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.vocab_size == len(theirs)
    assert ours.eos_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    for text in TEXTS + corpus(5):
        for add in (True, False):
            assert ours.encode(text, add) == theirs.encode(text, add_special_tokens=add), text
    ids = ours.encode("The cat" + EOS + " sat", True)
    for skip in (True, False):
        assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.spec == {"kind": "hf", "path": os.path.join(str(tmp_path), "tokenizer.json"),
                         "bos": bos, "eos": EOS}


def test_training_spec_and_workdir(tmp_path):
    byte = spec_tokenizer({"kind": "byte"})
    assert byte.encode("hi", True) == [256, 104, 105] and byte.encode("hi", False) == [104, 105]
    assert byte.decode([256, 104, 105, 257]) == "hi"
    # A training run records its tokenizer spec in each checkpoint's meta item.
    meta = tmp_path / "run" / "checkpoints" / "7" / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"tokenizer": {"kind": "byte"}}))
    assert resolve_tokenizer(str(tmp_path / "run")).vocab_size == 259
    assert resolve_tokenizer(None, "byte").bos_id == 256
