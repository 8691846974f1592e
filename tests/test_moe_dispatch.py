"""expert_ffn against a per-token loop: dropless, expert-parallel slices, capacity drops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.model.moe_dispatch import ExpertFFNOutput, expert_capacity, expert_ffn

T, K, E, D, F = 24, 3, 8, 12, 10


def _inputs(seed, skew=False, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (T, D)).astype(dtype)
    # Distinct experts per token, as top-k gives; ``skew`` sends most tokens to expert 5.
    logits = jax.random.normal(ks[1], (T, E)) + (jnp.eye(E)[5] * 4.0 if skew else 0.0)
    ids = jax.lax.top_k(logits, K)[1].astype(jnp.int32)
    weights = jax.nn.sigmoid(jax.random.normal(ks[2], (T, K)))
    gate_up = (jax.random.normal(ks[3], (E, D, F, 2)) / np.sqrt(D)).astype(dtype)
    down = (jax.random.normal(ks[4], (E, F, D)) / np.sqrt(F)).astype(dtype)
    return x, ids, weights, gate_up, down


def naive(x, ids, weights, gate_up, down, keep=None, group_offset=0):
    """Per token, per k: weight * SwiGLU expert, float64; ``keep`` [T, K] masks assignments."""
    x, gate_up, down = (np.asarray(a, np.float64) for a in (x, gate_up, down))
    ids, weights = np.asarray(ids), np.asarray(weights, np.float64)
    y = np.zeros((T, D))
    for t in range(T):
        for j in range(K):
            e = ids[t, j] - group_offset
            if not 0 <= e < gate_up.shape[0] or (keep is not None and not keep[t, j]):
                continue
            gate, up = x[t] @ gate_up[e, :, :, 0], x[t] @ gate_up[e, :, :, 1]
            h = gate / (1.0 + np.exp(-gate)) * up
            y[t] += weights[t, j] * (h @ down[e])
    return y


@pytest.mark.parametrize("implementation", ["cpu_bucketed", "reference"])
@pytest.mark.parametrize("skew", [False, True])
def test_dropless_matches_naive(implementation, skew):
    args = _inputs(0, skew)
    out = expert_ffn(*args, implementation=implementation)
    assert isinstance(out, ExpertFFNOutput) and out.y_td.dtype == jnp.float32
    assert int(out.num_dropped) == 0
    np.testing.assert_allclose(out.y_td, naive(*args), atol=1e-4, rtol=1e-4)


def test_bf16_keeps_dtype():
    args = _inputs(1, dtype=jnp.bfloat16)
    y = expert_ffn(*args).y_td
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), naive(*args), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("e_local", [1, 2, 4])
def test_group_offset_slices_sum_to_full(e_local):
    x, ids, weights, gate_up, down = _inputs(2, skew=True)
    full = expert_ffn(x, ids, weights, gate_up, down).y_td
    f = jax.jit(expert_ffn)
    parts = []
    for off in range(0, E, e_local):
        sl = slice(off, off + e_local)
        y = f(x, ids, weights, gate_up[sl], down[sl], group_offset=jnp.int32(off)).y_td
        np.testing.assert_allclose(
            y, naive(x, ids, weights, gate_up[sl], down[sl], group_offset=off), atol=1e-4
        )
        parts.append(y)
    np.testing.assert_allclose(sum(parts), full, atol=1e-4, rtol=1e-4)


def _kept(ids, cap, e_lo, e_hi):
    """Expected keep mask: per expert, the first ``cap`` assignments in (t, k) order."""
    ids = np.asarray(ids)
    keep, seen = np.zeros(ids.shape, bool), {}
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            seen[e] = seen.get(e, 0) + 1
            keep[t, j] = e_lo <= e < e_hi and seen[e] <= cap
    return keep


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_expected_assignments(capacity_factor):
    args = _inputs(3, skew=True)
    cap = expert_capacity(capacity_factor, T, K, E)
    keep = _kept(args[1], cap, 0, E)
    out = jax.jit(expert_ffn, static_argnames="capacity_factor")(
        *args, capacity_factor=capacity_factor
    )
    assert int(out.num_dropped) == T * K - keep.sum() > 0  # skewed: something is dropped
    np.testing.assert_allclose(out.y_td, naive(*args, keep=keep), atol=1e-4, rtol=1e-4)


def test_capacity_with_expert_parallel_shard():
    x, ids, weights, gate_up, down = _inputs(4, skew=True)
    off, e_local = 4, 2
    cap = expert_capacity(1.0, T, K, E)
    out = expert_ffn(x, ids, weights, gate_up[off:off + e_local], down[off:off + e_local],
                     group_offset=off, num_experts=E, capacity_factor=1.0)
    keep = _kept(ids, cap, off, off + e_local)
    local = (np.asarray(ids) >= off) & (np.asarray(ids) < off + e_local)
    assert int(out.num_dropped) == local.sum() - keep.sum() > 0
    want = naive(x, ids, weights, gate_up[off:off + e_local], down[off:off + e_local],
                 keep=keep, group_offset=off)
    np.testing.assert_allclose(out.y_td, want, atol=1e-4, rtol=1e-4)


def test_ample_capacity_equals_dropless():
    args = _inputs(5, skew=True)
    dropless = expert_ffn(*args).y_td
    out = expert_ffn(*args, capacity_factor=float(E))  # capacity T*K: nothing can drop
    assert int(out.num_dropped) == 0
    np.testing.assert_allclose(out.y_td, dropless, atol=1e-6, rtol=1e-6)


def test_gradients_match_dense_reference():
    """d/dx, d/dweights, d/dgate_up, d/ddown against every-token-through-every-expert."""
    x, ids, weights, gate_up, down = _inputs(6, skew=True)

    def dense(x, weights, gate_up, down):
        combine_te = jnp.sum(jax.nn.one_hot(ids, E) * weights[..., None], axis=1)
        h = jnp.einsum("td,edfc->tefc", x, gate_up, precision="highest")
        act = jax.nn.silu(h[..., 0]) * h[..., 1]
        y_ted = jnp.einsum("tef,efd->ted", act, down, precision="highest")
        return jnp.einsum("ted,te->td", y_ted, combine_te, precision="highest")

    def sparse(x, weights, gate_up, down):
        return expert_ffn(x, ids, weights, gate_up, down).y_td

    dy = jax.random.normal(jax.random.PRNGKey(7), (T, D))
    _, vjp = jax.vjp(jax.jit(sparse), x, weights, gate_up, down)
    _, vjp_ref = jax.vjp(dense, x, weights, gate_up, down)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
