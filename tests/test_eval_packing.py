"""Packed fixed-shape scoring (mimo_jax.eval.packing): the packing itself, equality with an
unpacked forward, independence from batch size and bucket set, one compilation per bucket,
data-parallel meshes on the 8 simulated devices, and the multi-host batch broadcast."""

from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMo, ModelConfig
from mimo_jax import sharding as sh
from mimo_jax.eval.multihost import BatchBroadcast, follow
from mimo_jax.eval.packing import (
    TRACE_COUNTS,
    Packing,
    Scorer,
    ScoreRequest,
    default_buckets,
    loglikelihood_request,
    make_batches,
    pack_rows,
    parse_buckets,
)
from mimo_jax.model.config import AttentionSpec
from mimo_jax.parallel import create_sharded

# Every dimension a mesh splits is even; a sliding window (6 keys) far shorter than the rows.
CFG = ModelConfig.tiny(
    vocab_size=96, hidden_size=32, num_layers=3, intermediate_size=48, moe_intermediate_size=16,
    num_experts=4, num_experts_per_tok=2, num_mtp_layers=0, max_position_embeddings=256,
    full_attention=AttentionSpec(4, 2, 16, 8, 5e6, 0.5, False, None),
    sliding_attention=AttentionSpec(4, 2, 16, 8, 1e4, 0.5, True, 6),
    layer_types=("full", "sliding", "sliding"))
MAX_LEN = 96


def _requests(n: int = 30, seed: int = 0) -> list[ScoreRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, MAX_LEN + 1))
        k = int(rng.integers(1, min(length, 12) + 1))
        out.append(ScoreRequest(tuple(rng.integers(0, CFG.vocab_size, length).tolist()),
                                tuple(rng.integers(0, CFG.vocab_size, k).tolist())))
    return out


@pytest.fixture(scope="module")
def model() -> MiMo:
    m = MiMo(CFG, rngs=nnx.Rngs(0))
    layer = m.prefix_layers[0]
    if layer.attn.sinks is not None:  # sinks that matter
        layer.attn.sinks[...] = jax.random.normal(jax.random.key(3), layer.attn.sinks.shape)
    return m


@pytest.fixture(scope="module")
def reference(model):
    """(log-prob sum, all greedy) per request from one unpacked forward (rows right-padded:
    causal attention makes the padding invisible)."""
    reqs = _requests()
    ids = np.zeros((len(reqs), MAX_LEN), np.int32)
    for i, r in enumerate(reqs):
        ids[i, : len(r.tokens)] = r.tokens
    logits = nnx.jit(lambda m, x: m(x, compute_mtp=False).logits)(model, jnp.asarray(ids))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    out = []
    for i, r in enumerate(reqs):
        n, k = len(r.tokens), len(r.targets)
        rows = logp[i, n - k: n]
        out.append((float(rows[np.arange(k), r.targets].sum()),
                    bool((rows.argmax(-1) == np.asarray(r.targets)).all())))
    return reqs, out


def test_loglikelihood_request_truncates_like_lm_eval():
    r = loglikelihood_request([1, 2, 3], [4, 5], max_length=8)
    assert r.tokens == (1, 2, 3, 4) and r.targets == (4, 5)
    r = loglikelihood_request(list(range(1, 11)), [11, 12], max_length=5)  # left truncation
    # (context + continuation)[-(5 + 1):][:-1]: the last 5 inputs, the continuation at the end.
    assert r.tokens == (7, 8, 9, 10, 11) and r.targets == (11, 12)
    with pytest.raises(ValueError, match="continuation is empty"):
        loglikelihood_request([1], [], max_length=8)
    with pytest.raises(ValueError, match="more than max_length=3"):
        loglikelihood_request([1], [2, 3, 4, 5], max_length=3)


def test_buckets():
    assert default_buckets(200) == (64, 128, 200)
    assert default_buckets(64) == (64,)
    assert parse_buckets("32:512:64", 128) == (32, 64, 128)
    assert parse_buckets([16], 40) == (16, 40)
    with pytest.raises(ValueError, match="bad buckets"):
        parse_buckets("a:b", 64)


def test_pack_rows_is_a_tight_valid_packing():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, 300).tolist()
    packing = Packing((16, 32, 64, 128), max_segments=6)
    rows = pack_rows(lengths, packing)
    seen = sorted(i for row in rows for i in row.members)
    assert seen == list(range(len(lengths)))  # every request exactly once
    for row in rows:
        assert sum(lengths[i] for i in row.members) == row.used <= row.bucket
        assert len(row.members) <= 6
        # The request that opened the row (the longest) picked the smallest bucket holding it.
        first = lengths[row.members[0]]
        assert row.bucket == packing.bucket_for(first)
    # Best fit leaves little room: the packed tokens use most of the row slots.
    assert sum(lengths) / sum(r.bucket for r in rows) > 0.8
    assert [r.members for r in rows] == [r.members for r in pack_rows(lengths, packing)]
    with pytest.raises(ValueError, match="longer than the longest bucket"):
        pack_rows([129], packing)


def test_auto_rows_spread_over_the_fewest_batches():
    packing = Packing((64, 256), max_batch_tokens=4 * 64)  # at most 4 rows of 64, 1 of 256
    assert packing.rows_per_batch(64, 9) == 3  # 3 batches of 3 rows: no padding row
    assert packing.rows_per_batch(64, 2) == 2 and packing.rows_per_batch(256, 5) == 1
    assert Packing((64,), row_multiple=4).rows_per_batch(64, 9) == 12  # data-parallel ways
    assert Packing((64,), batch_size=5).rows_per_batch(64, 1) == 5  # as the user asked


def test_batches_have_fixed_shapes_per_bucket():
    reqs = _requests(40)
    packing = Packing((32, 64, 96), batch_size=3)
    batches = make_batches(reqs, packing)
    shapes = {}
    for b in batches:
        shape = tuple(b.arrays[k].shape for k in ("ids", "score_pos"))
        assert shapes.setdefault(b.bucket, shape) == shape  # one shape per bucket
        assert b.arrays["ids"].shape == (3, b.bucket)
        seg = b.arrays["segment_ids"]
        for r, slot, i in b.owners:  # each request's tokens sit in its own segment
            assert list(b.arrays["ids"][r][seg[r] == slot + 1]) == list(reqs[i].tokens)
    assert sorted(i for b in batches for _, _, i in b.owners) == list(range(len(reqs)))


@pytest.mark.parametrize("packing", [
    Packing((48, 96), batch_size=4, max_segments=8),
    Packing((96,), batch_size=2),
    Packing((32, 96), max_batch_tokens=256),
], ids=["2-buckets", "one-bucket", "auto-rows"])
def test_scores_equal_unpacked_forward_and_compile_once_per_bucket(model, reference, packing):
    reqs, want = reference
    scorer = Scorer(model, packing, logits_chunk=64)  # chunked LM head (64 // rows tokens)
    before = TRACE_COUNTS["score"]
    got = scorer.score(reqs)
    lp, want_lp = np.array([g[0] for g in got]), np.array([w[0] for w in want])
    np.testing.assert_allclose(lp, want_lp, rtol=2e-5, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    stats = scorer.stats
    assert set(stats.compilations_by_bucket) <= set(packing.buckets)
    assert all(n == 1 for n in stats.compilations_by_bucket.values())
    assert TRACE_COUNTS["score"] - before == stats.compilations
    assert 0.0 <= stats.padding_fraction < 0.6 and stats.requests == len(reqs)
    # Same shapes again: nothing recompiles; requests in another order give the same scores.
    again = scorer.score(reqs[::-1])
    assert stats.compilations == sum(stats.compilations_by_bucket.values())
    assert TRACE_COUNTS["score"] - before == stats.compilations
    np.testing.assert_allclose([g[0] for g in again[::-1]], lp, rtol=1e-6)


def test_duplicates_are_scored_once(model, reference):
    reqs, want = reference
    scorer = Scorer(model, Packing((96,), batch_size=4))
    got = scorer.score(reqs[:3] * 3)
    assert scorer.stats.unique_requests == 3 and scorer.stats.requests == 9
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want[:3]] * 3, rtol=2e-5)


def test_bad_requests(model):
    scorer = Scorer(model, Packing((32,)))
    with pytest.raises(ValueError, match="longer than max_length=32"):
        scorer.score([ScoreRequest(tuple(range(33)), (1,))])
    with pytest.raises(ValueError, match="model vocabulary"):
        scorer.score([ScoreRequest((1, 2), (CFG.vocab_size,))])
    with pytest.raises(ValueError, match="at least one target"):
        ScoreRequest((1, 2), ())


@pytest.mark.slow  # test_eval_vs_hf checks the backend on a mesh in the default suite
@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=2,expert=2", "fsdp=4,tensor=2"])
def test_mesh_splits_the_batch_and_matches_one_device(model, reference, mesh_spec):
    """On 8 simulated devices (tests/conftest.py): parameters sharded, batch rows split over
    the data axes (rows rounded up to a multiple of them), the same scores."""
    reqs, want = reference
    mesh = sh.make_mesh(mesh_spec)
    rules = sh.ShardingRules.preset()
    sharded = create_sharded(CFG, mesh, rules)
    _copy_params(model, sharded)
    scorer = Scorer(sharded, Packing((96,), batch_size=3), mesh=mesh, rules=rules)
    ways = int(np.prod([mesh.shape[a] for a in rules.mesh_axes("batch")]))
    assert scorer.packing.row_multiple == ways
    got = scorer.score(reqs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=2e-5, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(n == 1 for n in scorer.stats.compilations_by_bucket.values())


def _copy_params(src: MiMo, dst: MiMo) -> None:
    """dst's sharded parameters take src's values (keeping dst's shardings)."""
    src_flat = dict(nnx.to_flat_state(nnx.state(src)))
    for path, var in nnx.to_flat_state(nnx.state(dst)):
        value = src_flat[path][...]
        var.set_value(jax.device_put(value, var[...].sharding))


class _FakeNetwork:
    """broadcast_one_to_all between a leader and one follower thread, through queues."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def leader(self, tree):
        self.q.put(jax.tree.map(np.copy, tree))
        return tree

    def follower(self, tree):
        got = self.q.get(timeout=600)
        want = jax.tree.map(np.shape, tree)
        assert jax.tree.map(np.shape, got) == want, "follower expected other shapes"
        return got


def test_followers_run_the_leaders_batches(model, reference):
    reqs, want = reference
    net = _FakeNetwork()
    packing = Packing((96,), batch_size=2)
    leader = Scorer(model, packing, channel=BatchBroadcast(net.leader))
    follower = Scorer(model, packing)
    seen = []

    def on_batch(arrays, out):
        seen.append(([a.copy() for a in arrays], [np.asarray(x) for x in out]))

    done = {}
    thread = threading.Thread(target=lambda: done.setdefault(
        "n", follow(follower, BatchBroadcast(net.follower), on_batch=on_batch)))
    thread.start()
    got = leader.score(reqs[:12])
    leader.channel.stop()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert done["n"] == leader.stats.batches == len(seen) == leader.channel.sent
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want[:12]], rtol=2e-5)
    # The follower computed the same per-slot sums as the leader for each batch it received.
    for arrays, (sums, greedy) in seen:
        mine_sums, mine_greedy = (np.asarray(x) for x in leader.run_arrays(arrays))
        np.testing.assert_allclose(sums, mine_sums, rtol=1e-6)
        assert (greedy == mine_greedy).all()
