"""Long-context serving plan: KV cache by layer type against all-global, and the CLI table."""

import pytest

from mimo_jax import ModelConfig
from mimo_jax.commands.plan import parse_contexts
from mimo_jax.parallel.plan import kv_cache_bytes, plan_long_context, plan_memory
from mimo_jax.sharding.rules import ShardingRules

RULES = ShardingRules.preset("fsdp_tensor_expert")


def M(**axes):
    """A full mesh shape: every mesh axis, size 1 unless given."""
    return {a: axes.get(a, 1) for a in ("data", "fsdp", "context", "expert", "tensor")}


def test_flash_kv_at_256k_matches_the_spec_arithmetic():
    cfg = ModelConfig.flash()
    kv = kv_cache_bytes(cfg, M(), RULES, batch=1, context=262_144)
    # spec paper.md §1.3: 9 global layers x 4 KV heads x (192 + 128) x 2 B per token
    assert kv["full"] == 9 * 4 * 320 * 2 * 262_144
    # 39 sliding layers, 8 KV heads, a ring of `window` (129) slots, length-independent
    assert kv["sliding"] == 39 * 8 * 320 * 2 * 129
    assert kv["mtp"] == 3 * 8 * 320 * 2 * 129
    assert kv["total"] == kv["full"] + kv["sliding"] + kv["mtp"]


@pytest.mark.parametrize("mesh", [M(), M(expert=8), M(tensor=2, expert=4)])
def test_hybrid_saving_approaches_layers_over_global_layers(mesh):
    cfg = ModelConfig.flash()
    plan = plan_long_context(cfg, mesh, RULES, contexts=(4096, 32_768, 262_144))
    savings = [r.saving for r in plan.rows]
    assert savings == sorted(savings)  # the rings' fixed cost matters less as context grows
    assert 48 / 9 * 0.99 < savings[-1] <= 48 / 9  # 5.33x for 48 layers with 9 global
    for r in plan.rows:
        assert r.kv_unwindowed > r.kv_all_global  # sliding layers have 2x the KV heads
        assert r.serve_total == plan.serving.params + plan.serving.transient + r.kv["total"]


def test_long_context_plan_general_config():
    cfg = ModelConfig.tiny(num_layers=12)  # global at 0, 5, 11
    plan = plan_long_context(cfg, M(), RULES, contexts=(1024,), batch=2)
    (row,) = plan.rows
    f, s = cfg.full_attention, cfg.sliding_attention
    assert row.kv["full"] == 3 * 2 * 1024 * f.num_kv_heads * (f.head_dim + f.v_head_dim) * 2
    assert row.kv["sliding"] == 9 * 2 * s.window * s.num_kv_heads * (s.head_dim + s.v_head_dim) * 2
    assert row.kv_all_global == 12 * 2 * 1024 * f.num_kv_heads * (f.head_dim + f.v_head_dim) * 2
    with pytest.raises(ValueError, match="positive"):
        plan_long_context(cfg, M(), RULES, contexts=(0,))


def test_context_axis_divides_training_activations():
    cfg = ModelConfig.tiny()
    one = plan_memory(cfg, M(fsdp=4), RULES, batch=4, seq=8192)
    ctx = plan_memory(cfg, M(fsdp=4, context=4), RULES, batch=4, seq=8192)
    assert ctx.activations < one.activations / 2


def test_parse_contexts():
    assert parse_contexts("32K,128k, 262144") == (32768, 131072, 262144)
    with pytest.raises(ValueError, match="--contexts"):
        parse_contexts("32K,x")


def test_cli_table(capsys):
    from mimo_jax.cli import main

    assert main(["plan", "--config", "tiny", "--mesh", "data=1", "--batch", "1", "--seq",
                 "1024", "--contexts", "1K,4K", "--chip", "v5e"]) == 0
    out = capsys.readouterr().out
    assert "long-context serving" in out and "all-global" in out and "fits v5e" in out
    assert main(["plan", "--config", "tiny", "--mesh", "data=1", "--batch", "1", "--seq",
                 "1024", "--contexts", "1K", "--chip", "nope"]) != 0


@pytest.mark.parametrize("scale", ["tiny", "v5p-8", "v5e-16", "v5p-128"])
def test_extension_recipe_every_stage_fits_its_scale(scale):
    from experiments.lib.spec import check_memory
    from experiments.long_context import SWEEP

    for exp in SWEEP.experiments:
        tc = exp.train_config(scale)
        s1, s2 = tc.stage_configs()
        assert s2.seq_len in (4 * s1.seq_len, 8 * s1.seq_len)
        assert s1.batch_size * s1.seq_len == s2.batch_size * s2.seq_len  # tokens per step
        assert s1.model_config().full_attention.rope_theta == 640_000.0
        assert s2.model_config().sliding_attention.rope_theta == 10_000.0
        assert s2.model_config().max_position_embeddings == s2.seq_len
        check_memory(tc, exp.scale(scale), host_bytes=16 << 30)  # raises if a stage does not fit
    bases = [e.train_config(scale).stage_configs()[1].model_config().full_attention.rope_theta
             for e in SWEEP.experiments]
    assert bases == [5_000_000.0, 640_000.0]


def test_memory_check_names_the_stage_that_does_not_fit():
    from experiments.lib.spec import ExperimentError, check_memory
    from experiments.long_context import SWEEP

    exp = SWEEP.experiments[0]
    tc = exp.train_config("v5e-16", ["stages=[{\"steps\": 10500, \"seq_len\": 262144, "
                                     "\"batch_size\": 8, \"grad_accum\": 2, "
                                     "\"model.max_position_embeddings\": 262144}]"])
    with pytest.raises(ExperimentError, match="stage 2"):
        check_memory(tc, exp.scale("v5e-16"))


# ------------------------------------------------------------------ synthetic passkey data
def test_passkey_documents_are_well_formed():
    import random

    from mimo_jax.data import passkey_docs as pd
    from mimo_jax.eval import passkey as ev

    # the training documents use the evaluation's template
    assert (pd.INTRO, pd.FILLER, pd.NEEDLE, pd.QUESTION) == (ev.INTRO, ev.FILLER, ev.NEEDLE,
                                                             ev.QUESTION)
    text = "def f(x):\n    return x + 1\n" * 50
    rng = random.Random(0)
    depths = []
    for filler_text, tail, tf in ((0.0, "qa", 3), (1.0, "text", 3), (0.0, "text", 3),
                                  (0.0, "qa", 0)):
        for _ in range(30):
            doc, info = pd.passkey_document(rng, 510, text, filler_text=filler_text, tail=tail,
                                            tail_filler=tf)
            key, a, n = info["key"], info["answer_at"], info["needle_at"]
            assert len(doc.encode("utf-8")) == 510 and doc.isascii()
            assert len(key) == 5 and key.isdigit()
            assert doc[a:a + 5] == key and doc[n:n + 5] == key and n < a
            episode = doc[:info["episode_bytes"]]
            assert episode.startswith(pd.INTRO)
            assert episode.endswith(pd.QUESTION + " " + key)
            assert episode.count(pd.NEEDLE.format(key=key)) == 1
            assert episode.count(pd.QUESTION) == 1
            assert doc.count(pd.NEEDLE.format(key=key)) == 1
            if tail == "qa":  # later answers repeat the same key
                later = doc[info["episode_bytes"]:].split(pd.QUESTION + " ")[1:]
                assert all(key.startswith(a[:5]) for a in later)
                if tf == 0:  # questions back to back: no filler in the tail
                    assert pd.FILLER not in doc[info["episode_bytes"]:]
            depths.append(info["depth"])
    assert min(depths) < 0.2 and max(depths) > 0.8
    with pytest.raises(ValueError, match="cannot hold"):
        pd.passkey_document(rng, 100, text)
    mixed = list(pd.passkey_documents(200, 300, seed=1, text=text, tail="qa", text_docs=0.2))
    plain = [d for d, info in mixed if info["key"] is None]
    assert 20 < len(plain) < 60 and all(len(d) == 300 and "pass key" not in d for d in plain)


def test_passkey_jsonl_packs_one_document_per_row(tmp_path):
    import numpy as np

    from mimo_jax.data import load_tokenizer
    from mimo_jax.data.passkey_docs import write_jsonl
    from mimo_jax.data.pipeline import split_documents, train_iterator
    from mimo_jax.data.sources import open_source

    path = write_jsonl(str(tmp_path / "pk.jsonl"), 12, 254, seed=3, filler_text=0.5,
                       tail="qa", text_docs=0.2)
    docs = open_source(path)
    assert len(docs) == 12
    it = train_iterator(docs, split_documents(12, 0.0, 0), load_tokenizer({"kind": "byte"}),
                        seq_len=256, batch_size=4, seed=0)
    for _ in range(3):
        b = next(it)
        assert (b["segment_ids"] == 1).all()  # each row is exactly one whole document
        np.testing.assert_array_equal(b["positions"][0], np.arange(256))
        assert (b["ids"][:, 0] == 256).all() and (b["ids"][:, -1] == 257).all()  # BOS, EOS


def test_passkey_benchmark_recipe(tmp_path):
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.long_context import passkey_setup, passkey_train_config

    tc = passkey_train_config(str(tmp_path), steps1=30, steps2=34, seq1=256, seq2=1024,
                              copy_steps=0)
    s1, s2 = tc.stage_configs()
    tc.validate(tc.model_config())
    assert (s1.seq_len, s2.seq_len, s2.steps) == (256, 1024, 34)
    assert s1.batch_size * s1.seq_len == s2.batch_size * s2.seq_len
    assert s1.model_config().full_attention.rope_theta == 640_000.0
    assert s2.model_config().full_attention.rope_theta == 5_000_000.0
    assert s1.model_config().layer_types == ("full", "sliding", "sliding", "full")
    assert os.path.basename(s1.data.source).startswith("passkey-256-")
    assert os.path.exists(s1.data.source) and os.path.exists(s2.data.source)
    # one rotary fraction for both layer types (the hub config has one)
    assert (s1.model_config().full_attention.partial_rotary_factor
            == s1.model_config().sliding_attention.partial_rotary_factor)
    # a stage of shorter documents first: three stages, same tokens per step
    tc = passkey_train_config(str(tmp_path / "c"), steps1=30, steps2=34, seq1=512, seq2=1024,
                              short_steps=10, short_seq=256, tail_filler=0, lr=1e-3,
                              copy_steps=0)
    s0, s1, s2 = tc.stage_configs()
    assert (s0.steps, s0.seq_len, s1.seq_len, s2.seq_len) == (10, 256, 512, 1024)
    assert s0.batch_size * 256 == s1.batch_size * 512 == s2.batch_size * 1024
    assert s0.lr == s1.lr == 1e-3 and s2.lr == 1e-4
    assert s0.model_config().full_attention.rope_theta == 640_000.0
    # the copy warm-up (the default), then shorter documents, then the two stages
    tc = passkey_train_config(str(tmp_path / "e"), steps1=30, steps2=34, seq1=512, seq2=1024,
                              copy_steps=8, short_steps=6, short_seq=256, weight_decay=0.05)
    c, s0, s1, s2 = tc.stage_configs()
    assert [st.steps for st in (c, s0, s1, s2)] == [8, 14, 30, 34]
    assert os.path.basename(c.data.source).startswith("copy-256-")
    assert os.path.basename(s0.data.source).startswith("passkey-256-")
    assert c.batch_size * 256 == s1.batch_size * 512
    assert all(st.weight_decay == 0.05 for st in (c, s0, s1, s2))
    with open(c.data.source) as f:
        doc = json.loads(f.readline())["text"]
    period = doc.index(". ") + 2  # a random string repeated
    assert len(doc) == 254 and doc[period:2 * period] == doc[:period]
    opts = dict(copy_steps=8, short_steps=6, short_seq=256, weight_decay=0.05)
    text = passkey_setup(str(tmp_path / "e"), tc, 20, [0.0, 1.0], {}, True, opts)
    assert "steps 0-8 on copy documents" in text
    assert "steps 8-14 on shorter passkey documents" in text
    assert "AdamW weight decay 0.05" in text
    with pytest.raises(ValueError, match="before stage 1"):
        passkey_train_config(str(tmp_path / "f"), steps1=30, steps2=34, copy_steps=30)
    with pytest.raises(ValueError, match="unknown passkey options"):
        passkey_train_config(str(tmp_path / "d"), steps1=30, steps2=34, bogus=1)
