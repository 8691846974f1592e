"""The MOPD loss (Eq. 7/9 + IcePop) and its gradient against a direct numpy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.post_train.loss import group_advantages, mopd_loss


def np_group_adv(r, g, eps=1e-6):
    out = np.zeros_like(r)
    for k in np.unique(g):
        sel = g == k
        out[sel] = (r[sel] - r[sel].mean()) / (r[sel].std() + eps)
    return out


def np_mopd(lp, mu, te, mask, adv_orm, alpha, lo, hi):
    """Loss and d loss / d lp, written out token by token."""
    b, t = lp.shape
    grad = np.zeros_like(lp)
    seqs, total, dropped = [], 0, 0
    for i in range(b):
        n = int(mask[i].sum())
        if n == 0:
            continue
        acc = 0.0
        for j in range(t):
            if not mask[i, j]:
                continue
            ratio = np.exp(lp[i, j] - mu[i, j])
            w = ratio if lo <= ratio <= hi else 0.0
            total += 1
            dropped += w == 0.0
            a = (te[i, j] - lp[i, j]) + alpha * adv_orm[i]
            acc += w * a * lp[i, j]
            grad[i, j] = w * a / n  # w and A are stop-gradient
        seqs.append((i, acc / n))
    m = len(seqs)
    loss = -sum(v for _, v in seqs) / max(m, 1)
    return loss, -grad / max(m, 1), dropped / max(total, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_numpy(seed):
    rng = np.random.default_rng(seed)
    b, t = 9, 7
    lp = rng.normal(-2.0, 1.0, (b, t)).astype(np.float32)
    mu = (lp + rng.normal(0, 0.8, (b, t))).astype(np.float32)  # ratios inside and outside
    te = rng.normal(-2.0, 1.0, (b, t)).astype(np.float32)
    mask = rng.random((b, t)) < 0.7
    mask[0] = False  # an empty response: not a sequence of the mean
    mu[1] = lp[1] + 3.0  # a whole sequence dropped (ratio e^-3 < 0.5)
    # groups: {2,3,4}, {5,6}, singletons {1}, {7}, {8}; {0} empty
    groups = np.array([0, 1, 2, 2, 2, 3, 3, 4, 5])
    rewards = rng.integers(0, 2, b).astype(np.float32)
    rewards[5:7] = 1.0  # an all-equal group: advantage 0
    adv = np.asarray(group_advantages(jnp.asarray(rewards), jnp.asarray(groups), 6))
    np.testing.assert_allclose(adv, np_group_adv(rewards, groups), atol=1e-5)
    assert adv[1] == 0 and adv[7] == 0 and adv[8] == 0 and np.all(adv[5:7] == 0)
    alpha, lo, hi = 0.7, 0.5, 5.0

    def f(x):
        return mopd_loss(x, jnp.asarray(mu), jnp.asarray(te), jnp.asarray(mask),
                         jnp.asarray(adv), alpha=alpha, eps_low=lo, eps_high=hi)

    parts = f(jnp.asarray(lp))
    g = jax.grad(lambda x: f(x).loss)(jnp.asarray(lp))
    want_loss, want_grad, want_drop = np_mopd(lp, mu, te, mask, adv, alpha, lo, hi)
    np.testing.assert_allclose(float(parts.loss), want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(parts.drop_rate), want_drop, rtol=1e-6)
    assert np.all(np.asarray(g)[1] == 0)  # all dropped: no gradient
    assert np.all(np.asarray(g)[~mask] == 0)
    assert 0 < want_drop < 1


def test_all_tokens_dropped_gives_zero_loss_and_gradient():
    lp = jnp.full((3, 4), -1.0)
    mask = jnp.ones((3, 4), bool)
    parts = mopd_loss(lp, lp + 10.0, lp - 1.0, mask, jnp.ones(3), alpha=1.0, eps_low=0.5,
                      eps_high=5.0)
    g = jax.grad(lambda x: mopd_loss(x, lp + 10.0, lp - 1.0, mask, jnp.ones(3), alpha=1.0,
                                     eps_low=0.5, eps_high=5.0).loss)(lp)
    assert float(parts.loss) == 0.0 and float(parts.drop_rate) == 1.0
    assert np.all(np.asarray(g) == 0)


def test_on_policy_gradient_is_reverse_kl_descent():
    """With w = 1 and alpha = 0 the gradient is d/d lp of -sum sg(te - lp) lp: raising a
    token's log-prob where the teacher likes it more lowers the loss."""
    lp = jnp.asarray([[-2.0, -1.0]])
    te = jnp.asarray([[-1.0, -3.0]])  # teacher prefers token 0 more, token 1 less
    g = jax.grad(lambda x: mopd_loss(x, lp, te, jnp.ones((1, 2), bool), jnp.zeros(1),
                                     alpha=0.0, eps_low=0.5, eps_high=5.0).loss)(lp)
    assert g[0, 0] < 0 < g[0, 1]
