"""Context parallelism on 8 simulated CPU devices: the sequence split over the `context` mesh
axis gives the single-device attention, model logits, gradients and training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from mimo_jax import ModelConfig
from mimo_jax import sharding as sh
from mimo_jax.model import context_parallel as cp
from mimo_jax.model.config import AttentionSpec
from mimo_jax.model.mimo import MiMo
from mimo_jax.parallel import create_sharded

RULES = sh.ShardingRules.preset()


def _packed_segments(rng, b: int, t: int) -> jnp.ndarray:
    """Documents of random lengths (some straddle shard boundaries), padding at the end."""
    seg = np.sort(rng.randint(1, 5, (b, t)), axis=1)
    seg[-1, -5:] = 0
    return jnp.asarray(seg, jnp.int32)


# ----------------------------------------------------------------------------- mesh and rules


def test_mesh_specs_with_and_without_context():
    assert sh.mesh_shape("fsdp=-1,expert=4", 8)["context"] == 1  # old specs: context=1
    assert sh.mesh_shape("data=2,context=-1", 8) == {"data": 2, "fsdp": 1, "context": 4,
                                                      "expert": 1, "tensor": 1}
    mesh = sh.make_mesh("context=2,tensor=2,expert=2")
    assert dict(mesh.shape)["context"] == 2
    # A hand-built mesh from before the context axis still works (context = 1).
    old = jax.make_mesh((2, 4), ("data", "fsdp"))
    assert sh.axis_size(old, "context") == 1
    got = sh.activation_sharding(old, RULES, (8, 16, 8), ("batch", "seq", "act_embed"))
    assert got.spec == jax.P(("data", "fsdp"), None, None)


def test_weights_never_shard_over_context():
    assert RULES.mesh_axes("seq") == ("context",)
    for name, axes in RULES.rules:
        if name not in ("batch", "seq", "act_embed", "act_vocab"):
            assert "context" not in axes, name
    with pytest.raises(sh.ShardingError, match="never shard over the 'context' axis"):
        sh.ShardingRules.preset(embed="context")


def test_zigzag_layout_round_trip():
    mesh = sh.make_mesh("data=2,context=4")
    x = jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3)
    with sh.activate(mesh, RULES):
        layout = cp.sequence_layout(32)
        assert cp.sequence_layout(30) is None  # not a multiple of 2 x context: not split
        z = jax.jit(lambda a: layout.to_shards(a, ("batch", "seq", None)))(x)
        back = jax.jit(lambda a: layout.to_natural(a, ("batch", "seq", None)))(z)
    order = np.concatenate([np.arange(c * 4, c * 4 + 4) for c in cp.zigzag_chunks(4).ravel()])
    np.testing.assert_array_equal(np.asarray(z), np.asarray(x)[:, order])
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
    # Shard i holds chunks i and 2n-1-i of the natural sequence.
    assert z.sharding.spec[1] == "context"


# ----------------------------------------------------------------------------- attention op

# (mesh, window, global implementation): the halo path (window - 1 <= chunk), global layers by
# all-gather and by ring, and a window wider than a chunk (served by gather / ring).
OP_CASES = [
    ("data=2,context=4", 6, "allgather"),     # T=96: chunks of 12, halo 5
    ("context=8", 7, "ring"),                 # chunks of 6, halo 6 = a whole chunk
    ("context=8", None, "ring"),
    ("data=2,context=4", None, "allgather"),
    ("context=8", 20, "allgather"),           # halo 19 > chunk 6: gathered K/V, windowed
]
OP_SLOW = [("context=4,fsdp=2", None, "ring"), ("context=8", None, "allgather"),
           ("context=8", 6, "allgather"), ("data=2,context=4", 30, "ring"),
           ("context=4,tensor=2", 1, "ring")]


def _check_attention(mesh_spec, window, impl, *, segments=True, sinks=True, t=96):
    mesh = sh.make_mesh(mesh_spec)
    b, hq, hkv, d, dv = 2, 4, 2, 16, 8
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (b, t, hq, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, dv))
    s = jax.random.normal(ks[3], (hq,)) if sinks else None
    seg = _packed_segments(np.random.RandomState(0), b, t) if segments else None

    def one(q, k, v, s):
        return pallas_kernels.attention(q, k, v, sinks=s, window=window, segment_ids=seg)

    want, vjp = jax.vjp(one, q, k, v, s)
    ct = jax.random.normal(ks[4], want.shape)
    with sh.activate(mesh, RULES):
        layout = cp.sequence_layout(t)
        axes = ("batch", "seq", None, None)

        def split(q, k, v, s):
            z = lambda x: layout.to_shards(x, axes)  # noqa: E731
            o = cp.context_attention(
                z(q), z(k), z(v), sinks=s, window=window,
                segment_ids=None if seg is None else layout.to_shards(seg), layout=layout,
                batch_axes=tuple(a for a in ("data",) if mesh.shape[a] > 1),
                head_axes=tuple(a for a in ("tensor",) if mesh.shape[a] > 1),
                global_attention=impl)
            return layout.to_natural(o, axes)

        got, vjp_cp = jax.vjp(jax.jit(split), q, k, v, s)
        grads = vjp_cp(ct)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    for g_cp, g_one in zip(grads, vjp(ct), strict=True):
        if g_one is not None:
            np.testing.assert_allclose(np.asarray(g_cp), np.asarray(g_one), atol=2e-5)


@pytest.mark.parametrize("mesh_spec,window,impl", OP_CASES)
def test_attention_matches_one_device(mesh_spec, window, impl):
    _check_attention(mesh_spec, window, impl)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec,window,impl", OP_SLOW)
@pytest.mark.parametrize("segments,sinks", [(True, True), (False, False), (True, False)])
def test_attention_matches_one_device_grid(mesh_spec, window, impl, segments, sinks):
    _check_attention(mesh_spec, window, impl, segments=segments, sinks=sinks, t=64)


def test_unknown_global_implementation():
    with pytest.raises(ValueError, match="unknown context-parallel global attention"):
        with cp.use_global_attention("ulysses"):
            pass


# ----------------------------------------------------------------------------- the model

# Sinks on both layer types (the release has them on sliding layers only: the ring must fold a
# sink in exactly once too). Window 7 over chunks of 12 (context 4) or 6 (context 8, fallback).
CFG = ModelConfig.tiny(full_attention=AttentionSpec(4, 2, 16, 8, 5e6, 0.25, True, None),
                       sliding_attention=AttentionSpec(4, 2, 16, 8, 1e4, 0.25, True, 7),
                       num_layers=4, num_mtp_layers=1, vocab_size=128, hidden_size=32,
                       intermediate_size=64, moe_intermediate_size=16)


def _loss(model, ids, seg):
    out = model(ids, segment_ids=seg)
    return jnp.mean(out.logits**2) + jnp.mean(out.mtp_logits**2), out


@pytest.fixture(scope="module")
def one_device():
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 96)), jnp.int32)
    seg = _packed_segments(rng, 2, 96)
    model = MiMo(CFG, rngs=nnx.Rngs(0))
    (_, out), grads = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))(model, ids, seg)
    return ids, seg, out, grads


def _check_model(one_device, mesh_spec, impl="allgather"):
    ids, seg, want, want_grads = one_device
    mesh = sh.make_mesh(mesh_spec)
    model = create_sharded(CFG, mesh, RULES, seed=0)
    with sh.activate(mesh, RULES), cp.use_global_attention(impl):
        (_, out), grads = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))(model, ids, seg)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want.logits), atol=2e-6)
    np.testing.assert_allclose(np.asarray(out.mtp_logits), np.asarray(want.mtp_logits),
                               atol=2e-6)
    np.testing.assert_array_equal(np.asarray(out.router.expert_ids),
                                  np.asarray(want.router.expert_ids))
    for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads),
                                 strict=True):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(w.get_value()),
                                   rtol=2e-4, atol=1e-8, err_msg=str(path))


def test_model_matches_one_device(one_device):
    _check_model(one_device, "data=2,context=4")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec,impl", [("context=4,fsdp=2", "ring"),
                                            ("context=2,tensor=2,expert=2", "allgather"),
                                            ("context=8", "ring"), ("context=8", "allgather")])
def test_model_matches_one_device_grid(one_device, mesh_spec, impl):
    _check_model(one_device, mesh_spec, impl)


# ----------------------------------------------------------------------------- training


@pytest.mark.slow  # two training runs (~1 min on 2 free cores); the model test covers grads
def test_training_with_context_axis_matches_one_device(tmp_path):
    from test_train_resume import SMALL, tiny_corpus

    from mimo_jax.train import TrainConfig, train

    corpus = tiny_corpus(tmp_path / "corpus", 40)
    base = TrainConfig.preset("tiny-cpu").override(
        [*SMALL, f"data.source={corpus}", "batch_size=4", "steps=2", "tensorboard=false",
         "save_every=1000", "model.num_layers=3"]).override(
        {"model.sliding_attention": {"window": 5}})  # T=32 over 8 chunks of 4: a real halo
    single = train(base, str(tmp_path / "one"))
    sharded = train(base.override({"mesh": "fsdp=2,context=4"}), str(tmp_path / "cp"))
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-4)
    mesh = sh.make_mesh("fsdp=2,context=4")
    for path, var in nnx.to_flat_state(nnx.state(sharded.model)):
        sharding = var.get_value().sharding  # weights: FSDP'd, never split over context
        assert "context" not in str(sharding.spec), path
    want = jax.NamedSharding(mesh, jax.P("tensor", "fsdp"))
    assert sharded.model.embed[...].sharding.is_equivalent_to(want, 2)


@pytest.mark.slow  # one training run: ~1.5 min on 2 free cores (5 min on a loaded machine)
def test_train_step_compiles_once_on_a_context_mesh(tmp_path, monkeypatch):
    """The jitted step hands its state back in the shardings it was given, so steps 2.. reuse
    step 1's executable (on `fsdp=2,context=4` some leaves used to come back in another
    layout and step 2 compiled again)."""
    from test_train_resume import SMALL, tiny_corpus

    import mimo_jax.train.loop as loop_mod
    from mimo_jax.train import TrainConfig, train

    made = []

    def capture(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = loop_mod.make_train_step
    monkeypatch.setattr(loop_mod, "make_train_step", capture)
    corpus = tiny_corpus(tmp_path / "corpus", 20)
    tc = TrainConfig.preset("tiny-cpu").override(
        [*SMALL, f"data.source={corpus}", "batch_size=4", "steps=3", "tensorboard=false",
         "save_every=1000", "data.val_batches=0", "seq_len=16", "model.num_mtp_layers=1"]
    ).override({"mesh": "fsdp=2,context=4"})
    out = train(tc, str(tmp_path / "cp"))
    assert out.step == 3 and len(made) == 1
    assert made[0]._cache_size() == 1
