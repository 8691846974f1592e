"""The training objective: MTP target alignment, chunked CE, document boundaries, balancing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mimo_jax import MiMo, ModelConfig
from mimo_jax.model.layers import RouterBias
from mimo_jax.train import TrainConfig
from mimo_jax.train.balance import bias_delta, bias_rows, load_imbalance, update_bias
from mimo_jax.train.loss import chunked_cross_entropy, loss_parts, shifted_targets, total_loss
from mimo_jax.train.metrics import flops_per_token
from mimo_jax.train.optimizer import decay_mask, lr_schedule


def _cfg(**kw):
    base = dict(num_layers=3, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                vocab_size=64, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig.tiny(**base)


def _batch(ids, seg):
    ids, seg = jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)
    from mimo_jax.model.mimo import default_positions

    return {"ids": ids, "segment_ids": seg, "positions": default_positions(ids.shape, seg)}


def test_mtp_target_alignment_hand_made():
    ids = jnp.asarray([[10, 11, 12, 13, 14, 20, 21, 22, 0, 0]])
    seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    # main head: t -> t+1; MTP head k (0-based): t -> t+k+2 (checkpoint.md §3M)
    tgt, valid = shifted_targets(ids, seg, 1)
    assert tgt[0, :7].tolist() == [11, 12, 13, 14, 20, 21, 22]
    assert valid[0].tolist() == [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]
    tgt, valid = shifted_targets(ids, seg, 2)  # head 0
    assert tgt[0, :3].tolist() == [12, 13, 14] and tgt[0, 5] == 22
    assert valid[0].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    tgt, valid = shifted_targets(ids, seg, 4)  # head 2
    assert tgt[0, 0] == 14 and valid[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def test_loss_parts_match_full_logits_and_chunking():
    cfg = _cfg()
    model = MiMo(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (2, 12))
    seg = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    batch = _batch(ids, seg)
    out = model(batch["ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    want_sum, want_cnt = [], []
    for h, logits in enumerate([out.logits, *out.mtp_logits]):
        tgt, valid = shifted_targets(batch["ids"], batch["segment_ids"], 1 + h)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
        want_sum.append(float(jnp.sum(nll * valid)))
        want_cnt.append(float(jnp.sum(valid)))
    for chunk in (10_000, 7):  # one chunk, and lax.map over padded chunks
        parts = loss_parts(model, batch, chunk=chunk)
        np.testing.assert_allclose(parts.nll_sum, want_sum, rtol=2e-5)
        np.testing.assert_allclose(parts.count, want_cnt)
    assert want_cnt == [4 + 6 + 8, 3 + 5 + 7, 2 + 4 + 6, 1 + 3 + 5]
    np.testing.assert_allclose(parts.balance, jnp.sum(out.router.balance_loss), rtol=1e-6)
    # total: main CE + lambda * mean over heads + coef * balance
    loss, aux = total_loss(parts, parts.count, mtp_lambda=0.3, balance_coef=1e-2, z_loss_coef=0.0)
    ce = np.array(want_sum) / np.array(want_cnt)
    np.testing.assert_allclose(loss, ce[0] + 0.3 * ce[1:].mean() + 1e-2 * parts.balance, rtol=1e-5)


def test_chunked_ce_gradient_matches_dense():
    h = jax.random.normal(jax.random.key(0), (23, 8))
    w = jax.random.normal(jax.random.key(1), (8, 50))
    t = jax.random.randint(jax.random.key(2), (23,), 0, 50)

    def dense(h, w):
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[:, None], 1))

    g1 = jax.grad(lambda h, w: jnp.sum(chunked_cross_entropy(h, w, t, 5)[0]), (0, 1))(h, w)
    g2 = jax.grad(dense, (0, 1))(h, w)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [64, 7])  # one chunk; several with a padded last one
def test_fused_ce_value_and_both_cotangents_match_dense(chunk):
    """The fused CE's own VJP against autodiff of the dense formula, with per-token weights on
    the NLL and a z-loss-style term on the log-partition (both outputs get cotangents)."""
    n, d, v = 30, 16, 97
    h = jax.random.normal(jax.random.key(0), (n, d))
    w = 0.5 * jax.random.normal(jax.random.key(1), (d, v))
    t = jax.random.randint(jax.random.key(2), (n,), 0, v)
    a = jax.random.uniform(jax.random.key(3), (n,))

    def objective(nll, lse):
        return jnp.sum(a * nll) + 1e-2 * jnp.sum(jnp.square(lse))

    def dense(h, w):
        logits = h @ w
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, t[:, None], 1)[:, 0]
        return objective(nll, lse)

    fused = lambda h, w: objective(*chunked_cross_entropy(h, w, t, chunk))  # noqa: E731
    np.testing.assert_allclose(fused(h, w), dense(h, w), rtol=1e-5)
    for got, want in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(dense, (0, 1))(h, w),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # bfloat16 activations and weights: gradients keep the input dtypes, values stay close.
    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    gh, gw = jax.grad(fused, (0, 1))(hb, wb)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    want_h, want_w = jax.grad(dense, (0, 1))(hb.astype(jnp.float32), wb.astype(jnp.float32))
    np.testing.assert_allclose(gh.astype(jnp.float32), want_h, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(gw.astype(jnp.float32), want_w, rtol=5e-2, atol=5e-2)


def test_segment_ids_stop_attention_and_loss_at_document_boundaries():
    cfg = _cfg()
    model = MiMo(cfg, rngs=nnx.Rngs(2))
    ids = np.random.default_rng(1).integers(0, 64, (1, 12))
    seg = np.array([[1] * 6 + [2] * 6])
    changed = ids.copy()
    changed[0, 6:] = (changed[0, 6:] + 7) % 64  # rewrite document 2 only

    def per_token(ids):
        b = _batch(ids, seg)
        out = model(b["ids"], positions=b["positions"], segment_ids=b["segment_ids"],
                    compute_logits=False)
        nll = []
        for h, hid in enumerate([out.hidden, *out.mtp_hidden]):
            tgt, valid = shifted_targets(b["ids"], b["segment_ids"], 1 + h)
            w = model.lm_head[...]
            n, _ = chunked_cross_entropy(hid.reshape(-1, cfg.hidden_size), w, tgt.reshape(-1), 64)
            nll.append(np.asarray(n * valid.reshape(-1)))
        return np.stack(nll)

    a, b = per_token(ids), per_token(changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)  # doc 1 unaffected
    assert not np.allclose(a[:, 6:], b[:, 6:])
    assert (a[0, 5] == 0) and (a[1, 4:6] == 0).all()  # no target across the boundary
    # padding rows count for nothing
    parts = loss_parts(model, _batch(np.zeros((1, 12)), np.zeros((1, 12))), chunk=64)
    assert float(jnp.sum(parts.count)) == 0 and float(jnp.sum(parts.nll_sum)) == 0


def _skewed_moe_model(cfg):
    """Every MoE layer's selection prefers experts 0 and 1 (a large correction bias)."""
    model = MiMo(cfg, rngs=nnx.Rngs(3))
    for layer in model.prefix_layers:
        if hasattr(layer.mlp, "router"):
            layer.mlp.correction_bias[...] = jnp.asarray([0.5, 0.5, 0.0, 0.0])
    return model


def test_bias_update_moves_skewed_load_toward_balance():
    cfg = _cfg(num_layers=2)
    model = _skewed_moe_model(cfg)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 16)))
    fwd = nnx.jit(lambda m, x: m(x, compute_mtp=False).router.expert_load)
    load0 = fwd(model, ids)
    imb0 = float(load_imbalance(load0)[0])
    assert imb0 > 1.5  # skewed by construction
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    for _ in range(60):
        load = fwd(nnx.merge(graphdef, params, other), ids)
        other = update_bias(other, load, 2e-2, cfg)
    imb1 = float(load_imbalance(fwd(nnx.merge(graphdef, params, other), ids))[0])
    assert imb1 < imb0 - 0.3, (imb0, imb1)
    bias = other["prefix_layers"][1]["mlp"]["correction_bias"][...]
    assert bias[0] < 0.5 and bias[1] < 0.5 and bias[2] > 0 and bias[3] > 0


def test_bias_rows_cover_prefix_and_scanned_layers():
    cfg = _cfg(num_layers=5)  # layer 0 dense, layers 1..4 MoE scanned as 4 blocks of 1
    model = MiMo(cfg, rngs=nnx.Rngs(0))
    rows = bias_rows(cfg)
    assert list(rows[("blocks", "layers", 0, "mlp", "correction_bias")]) == [0, 1, 2, 3]
    _, _, other = nnx.split(model, nnx.Param, ...)
    load = jnp.asarray([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 4.0]])
    new = update_bias(other, load, 1.0, cfg)
    b = new["blocks"]["layers"][0]["mlp"]["correction_bias"][...]
    np.testing.assert_array_equal(b, bias_delta(load, 1.0))
    assert isinstance(new["blocks"]["layers"][0]["mlp"]["correction_bias"], RouterBias)


def test_balance_loss_gradient_reduces_overloaded_scores():
    cfg = _cfg(num_layers=2, num_mtp_layers=0)
    model = _skewed_moe_model(cfg)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)))
    moe = model.prefix_layers[1].mlp
    x = jax.random.normal(jax.random.key(0), (2, 16, cfg.hidden_size))

    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def bal(params):
        _, r = nnx.merge(graphdef, params, rest)(x)
        return r.balance_loss, r.expert_load

    w0 = params["router"][...]
    (l0, load), g = jax.value_and_grad(bal, has_aux=True)(params)
    w1 = w0 - 0.5 * g["router"][...]
    params1 = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
    l1, _ = bal(params1)
    assert float(l1) < float(l0)
    s0 = jax.nn.sigmoid(x.reshape(-1, cfg.hidden_size) @ w0).mean(0)
    s1 = jax.nn.sigmoid(x.reshape(-1, cfg.hidden_size) @ w1).mean(0)
    hot = int(jnp.argmax(load))
    cold = int(jnp.argmin(load))
    assert s1[hot] < s0[hot] and s1[cold] > s0[cold]
    del ids


def test_weight_decay_mask_and_schedule():
    cfg = _cfg()
    _, params, _ = nnx.split(MiMo(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    flat = dict(nnx.to_flat_state(decay_mask(params)))
    by_name = {}
    for path, v in flat.items():
        by_name.setdefault(path[-1] if path[-1] != "weight" else path[-2], set()).add(v.get_value())
    assert by_name["input_norm"] == {False} and by_name["final_norm"] == {False}
    assert by_name["sinks"] == {False} and by_name["embed_norm"] == {False}
    assert by_name["q_proj"] == {True} and by_name["gate_up"] == {True}
    assert by_name["embed"] == {True} and by_name["eh_proj"] == {True}
    tc = TrainConfig(steps=100, warmup_steps=10, decay_steps=40, lr=1.0, end_lr=0.1)
    s = lr_schedule(tc)
    np.testing.assert_allclose([s(0), s(5), s(10), s(59), s(60), s(80), s(100)],
                               [0, 0.5, 1, 1, 1, 0.55, 0.1], atol=1e-6)
    tx = optax.adamw(1e-3, mask=decay_mask)
    tx.init(params)


@pytest.mark.parametrize("norm_scale", [0.0, 0.3, 1.0, 7.0])  # zero, below, at, above max
def test_clip_by_global_norm_matches_optax(norm_scale):
    from mimo_jax.train.optimizer import clip_by_global_norm

    rng = np.random.default_rng(0)
    g = {"a": rng.standard_normal((5, 3)), "b": {"c": rng.standard_normal((11,))}}
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    g = jax.tree.map(lambda x: x * (norm_scale * 2.0 / optax.tree.norm(g)), g)  # norm = 2 s
    ours, theirs = clip_by_global_norm(2.0), optax.clip_by_global_norm(2.0)
    assert jax.tree.structure(ours.init(g)) == jax.tree.structure(theirs.init(g))
    got, _ = ours.update(g, ours.init(g))
    want, _ = theirs.update(g, theirs.init(g))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert float(optax.tree.norm(got)) == pytest.approx(min(2.0, 2.0 * norm_scale), rel=1e-5)


def test_clipped_gradient_is_not_materialised():
    """The clip scale fuses into AdamW's moment updates: no kernel writes a clipped copy of a
    gradient (optax's divide did: one extra pass over every gradient)."""
    from mimo_jax.train.optimizer import make_optimizer

    tc = TrainConfig(warmup_steps=0)
    _, params = nnx.split(nnx.Linear(64, 48, rngs=nnx.Rngs(0)), nnx.Param)
    tx = make_optimizer(tc)

    def apply(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    hlo = jax.jit(apply).lower(params, tx.init(params), params).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):].splitlines()
    for moment in ("mu", "nu"):  # the kernel that updates each moment reads the raw gradient
        (line,) = [x for x in entry if " fusion(" in x and f"__{moment}__kernel" in x]
        assert "%g__kernel" in line, line
    # optax's clip: a [64, 48] kernel that only divides the gradient, read by both moments
    assert not [x for x in entry if " fusion(" in x and "f32[64,48]" in x and "/div" in x]


def test_flops_count_sliding_attention_as_linear_in_window():
    cfg = ModelConfig.tiny()
    short, long = flops_per_token(cfg, 1024), flops_per_token(cfg, 2048)
    full_only = cfg.replace(layer_types=("full",) * cfg.num_layers)
    d_full = flops_per_token(full_only, 2048) - flops_per_token(full_only, 1024)
    assert 0 < long - short < 0.5 * d_full  # sliding layers add nothing beyond the window
    assert flops_per_token(cfg, 256, num_mtp=0) < flops_per_token(cfg, 256)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [2])
def test_grad_accumulation_matches_one_batch(accum):
    from mimo_jax.train.optimizer import make_optimizer
    from mimo_jax.train.step import make_train_step

    tc = TrainConfig(model={"num_layers": 2, "hidden_size": 32, "vocab_size": 260,
                            "num_mtp_layers": 1}, seq_len=16, batch_size=4,
                     warmup_steps=0)  # the optimizer's own count starts at 0: lr 0 in warmup
    cfg = tc.model_config()
    ids = np.random.default_rng(5).integers(0, 259, (4, 16))
    seg = np.array([[1] * 16, [1] * 8 + [2] * 8, [1] * 4 + [0] * 12, [1] * 16])
    batch = _batch(ids, seg)
    outs = []
    for a in (1, accum):
        tca = tc.override({"grad_accum": a})
        graphdef, params, other = nnx.split(MiMo(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        tx = make_optimizer(tca)
        step = make_train_step(graphdef, tca, cfg, tx)
        # The step donates the state it is given: pass copies, `params` is compared below.
        state = jax.tree.map(jnp.copy, (params, other, tx.init(params)))
        outs.append(step(*state, batch, jnp.int32(3)))
    (p1, o1, _, m1), (p2, o2, _, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["mtp_ce"], m2["mtp_ce"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o2), strict=True):
        np.testing.assert_array_equal(a, b)  # same summed expert load -> same bias update
    # The updated parameters: accumulated microbatches step like the one large batch. AdamW's
    # first step moves each weight by about lr * sign(grad), so compare against that scale.
    lr = tc.lr
    moved = 0
    for (path, a), b, p0 in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p2),
                                jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * lr, err_msg=str(path))
        moved += int(np.sum(np.abs(np.asarray(a) - np.asarray(p0)) > 0.5 * lr))
    assert moved > 0.5 * sum(x.size for x in jax.tree.leaves(params))  # the step did move
