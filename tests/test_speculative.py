"""MTP speculative decoding: exactly the plain tokens (greedy), exactly the plain distribution
(sampling), and useful acceptance when the heads are good."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from test_generate import PROMPTS, small_cfg

from mimo_jax import MiMo
from mimo_jax.inference import generate, probabilities, sampling_params


@pytest.fixture(scope="module")
def random_model() -> MiMo:
    return MiMo(small_cfg(), rngs=nnx.Rngs(0))


def copy_heads_model(embed_scale: float = 3.0) -> MiMo:
    """Heads that read only the token embedding (eh_proj = [I; 0]) guess the main model's
    next-token function of the current token; the main model's context-dependent layers make
    it disagree sometimes, so drafts are partly accepted."""
    m = MiMo(small_cfg(), rngs=nnx.Rngs(0))
    d = m.cfg.hidden_size
    m.embed[...] = m.embed[...] * embed_scale
    for head in m.mtp:
        head.eh_proj[...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0)
    return m


@pytest.mark.parametrize("k", [1, 3])  # K = 2: in the sampling test
def test_greedy_speculative_equals_plain_random_model(random_model, k):
    plain = generate(random_model, PROMPTS, max_new_tokens=20)
    spec = generate(random_model, PROMPTS, max_new_tokens=20, speculative=k)
    assert spec.tokens == plain.tokens
    assert 1.0 <= spec.acceptance_length <= k + 1


def test_greedy_speculative_equals_plain_good_heads():
    model = copy_heads_model()
    plain = generate(model, PROMPTS, max_new_tokens=40)
    spec = generate(model, PROMPTS, max_new_tokens=40, speculative=3)
    assert spec.tokens == plain.tokens
    # Long runs accepted and some rejected: both rollback paths are exercised (ring wraps,
    # prompts 3..20 + 40 new tokens >> window 8).
    assert 2.0 < spec.acceptance_length < 4.0
    stop = plain.tokens[0][10]
    a = generate(model, PROMPTS, max_new_tokens=40, stop_tokens=[stop])
    b = generate(model, PROMPTS, max_new_tokens=40, stop_tokens=[stop], speculative=3)
    assert a.tokens == b.tokens
    assert generate(model, PROMPTS, max_new_tokens=7, speculative=3).tokens == [
        t[:7] for t in plain.tokens]


def test_batched_rows_advance_independently():
    """Batch 4, prompts of different lengths (3..20, the ring wraps): each row accepts its own
    number of drafts per round, and every row's tokens equal plain decoding and the same
    prompt generated alone (batch 1)."""
    model = copy_heads_model()
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]
    plain = generate(model, prompts, max_new_tokens=30)
    spec = generate(model, prompts, max_new_tokens=30, speculative=3)
    assert spec.tokens == plain.tokens
    for i in (0, 3):
        alone = generate(model, [prompts[i]], max_new_tokens=30, speculative=3)
        assert alone.tokens[0] == spec.tokens[i]
        assert alone.row_acceptance_lengths[0] == pytest.approx(spec.row_acceptance_lengths[i])
    rows = spec.row_acceptance_lengths
    assert len(set(np.round(rows, 6))) > 1, rows  # rows advanced by different amounts
    assert all(1.0 <= a <= 4.0 for a in rows)


def test_accept_is_per_row():
    """Row 0 rejects its first draft, row 1 accepts all (bonus from p_K), row 2 stops at the
    second; greedy (one-hot) distributions make the outcome deterministic."""
    from mimo_jax.inference.speculative import accept

    v = 6
    onehot = lambda ids: jax.nn.one_hot(jnp.asarray(ids), v)  # noqa: E731
    d = jnp.asarray([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    q = onehot(d)
    p = onehot([[4, 2, 3, 5], [1, 2, 3, 5], [1, 0, 3, 5]])
    a, nxt = accept(p, q, d, jax.random.key(0), jax.random.key(1))
    assert a.tolist() == [0, 3, 1] and nxt.tolist() == [4, 5, 0]


def test_sampled_speculative_has_the_main_distribution():
    """A batch of 4 different prompts (lengths 3..11, so rows sit at different positions and
    accept different numbers of drafts), each repeated N times, samples 3 tokens: t1 from the
    prefill, (t2, t3) from one speculative round with K = 2 (copy heads: q close to p but not
    equal, so drafts are both accepted and rejected, and the residual max(p - q, 0) is
    sampled). Each prompt's joint law of (t1, t2, t3) must be the main model's, computed
    exactly by enumeration.

    Threshold: chi-square goodness of fit at p > 1e-3 per prompt (the seed is fixed, so the
    test is deterministic; a correct sampler fails with probability ~4e-3 over seeds). With
    N = 2048 and 64 cells this detects a total-variation error of a few percent, far below
    what a wrong rule gives (e.g. accepting drafts without the p/q test shifts mass by tens
    of %).
    """
    model, n = copy_heads_model(1.0), 2048
    params = dict(temperature=1.3, top_k=4, top_p=1.0)  # top-k keeps the cells few
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 7, 2], [11, 5, 8, 13, 21, 34, 55, 1, 2, 3, 4],
               [60, 2, 9, 40, 33]]
    exact = [_exact_joint(model, p, sampling_params(**params)) for p in prompts]
    for spec_k in (2, 0):  # speculative, then plain sampling as a control
        out = generate(model, prompts * n, max_new_tokens=3, seed=11, speculative=spec_k,
                       **params)
        for i, want in enumerate(exact):
            counts: dict[tuple, int] = {}
            for t in out.tokens[i :: len(prompts)]:
                counts[tuple(t)] = counts.get(tuple(t), 0) + 1
            assert set(counts) <= set(want), "sampled a sequence of probability 0"
            keys = sorted(want)
            obs = np.array([counts.get(c, 0) for c in keys], float)
            exp = np.array([want[c] for c in keys]) * n
            chi2 = float(np.sum((obs - exp) ** 2 / exp))
            p_value = stats.chi2.sf(chi2, len(keys) - 1)
            assert p_value > 1e-3, (spec_k, i, chi2, p_value)
        if spec_k:
            assert 1.2 < out.acceptance_length < 2.8, out.acceptance_length


def _exact_joint(model, prompt, params) -> dict[tuple, float]:
    """P(t1, t2, t3) under the main model with the sampler's filtering, by enumeration."""
    fwd = nnx.jit(lambda m, ids: m(ids, compute_mtp=False).logits)

    def dist(prefixes):
        ids = jnp.asarray([prompt + list(p) for p in prefixes])
        logits = fwd(model, ids)[:, -1]
        return np.asarray(probabilities(logits, params), np.float64)

    out = {}
    p1 = dist([()])[0]
    for t1 in np.flatnonzero(p1):
        p2 = dist([(t1,)])[0]
        t2s = np.flatnonzero(p2)
        p3 = dist([(t1, t2) for t2 in t2s])
        for i, t2 in enumerate(t2s):
            for t3 in np.flatnonzero(p3[i]):
                out[(int(t1), int(t2), int(t3))] = p1[t1] * p2[t2] * p3[i, t3]
    total = sum(out.values())
    assert abs(total - 1) < 1e-4
    return out


@pytest.mark.slow
def test_greedy_speculative_equals_plain_trained_model():
    """A tiny model trained briefly (optax, next-token + MTP losses) on a repetitive
    sequence: heads become good drafts, and speculation still changes no token."""
    import optax

    model = MiMo(small_cfg(), rngs=nnx.Rngs(1))
    period = [int(x) for x in np.random.default_rng(0).integers(1, 64, 13)]
    data = jnp.asarray([(period * 20)[i : i + 48] for i in range(8)])
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, ids):
        def loss_fn(model):
            out = model(ids)
            lp = jax.nn.log_softmax(out.logits[:, :-1])
            loss = -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))
            for k in range(out.mtp_logits.shape[0]):
                lq = jax.nn.log_softmax(out.mtp_logits[k, :, : -(k + 2)])
                loss -= jnp.mean(jnp.take_along_axis(lq, ids[:, k + 2 :, None], -1))
            return loss

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(60):
        loss = train_step(model, opt, data)
    assert float(loss) < 2.0
    prompts = [period[:5], period * 2, period[3:9]]
    plain = generate(model, prompts, max_new_tokens=40)
    spec = generate(model, prompts, max_new_tokens=40, speculative=3)
    assert spec.tokens == plain.tokens
    assert spec.acceptance_length > 2.0


def test_cached_mtp_heads_equal_parallel_form(random_model):
    """Each head's ring-buffer cache, filled chunk by chunk (chunks 6 < window 8 < length 26),
    gives the rows (h[t], token t+k+1) of the model's parallel MTP forward."""
    from mimo_jax.inference import init_cache
    from mimo_jax.inference.decode import main_forward, mtp_forward
    from mimo_jax.inference.kv_cache import commit_main, commit_mtp

    model, cfg = random_model, random_model.cfg
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 26)).astype(np.int32)
    want = np.asarray(model(jnp.asarray(ids)).mtp_hidden)  # [n_mtp, B, T, D]
    graphdef, state = nnx.split(model)

    @jax.jit
    def chunk(state, cache, ids_all, s):
        m = nnx.merge(graphdef, state)
        pos = s + jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
        valid = pos < 26
        x = jnp.take_along_axis(ids_all, jnp.clip(pos, 0, 25), axis=1)
        start = jnp.full((2,), s, jnp.int32)
        _, hn, pn, bn = main_forward(m, cache, x, pos, valid, start)
        outs = []
        for k in range(cfg.num_mtp_layers):
            tok = jnp.take_along_axis(ids_all, jnp.clip(pos + k + 1, 0, 25), axis=1)
            out, new = mtp_forward(m, k, cache, hn, tok, pos, valid, start)
            cache = commit_mtp(cfg, cache, k, new, pos, valid)
            outs.append(out)
        return commit_main(cfg, cache, pn, bn, pos, valid), jnp.stack(outs)

    cache = init_cache(cfg, 2, 32, mtp_heads=cfg.num_mtp_layers)
    got = []
    for s in range(0, 30, 6):
        cache, out = chunk(state, cache, jnp.asarray(ids), jnp.int32(s))
        got.append(np.asarray(out))
    got = np.concatenate(got, axis=2)[:, :, :26]
    for k in range(cfg.num_mtp_layers):
        t = 26 - k - 1  # rows whose token t+k+1 exists
        np.testing.assert_allclose(got[k, :, :t], want[k, :, :t], atol=2e-5, rtol=1e-5)
