"""Cross-check against jax's own splash attention (interpret mode) on shapes it supports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from pallas_kernels.attn import attention
from pallas_kernels.attn.pallas_tpu import BlockSizes, pallas_tpu_attention


def _splash(q_hsd, k_hsd, v_hsd, sinks, window):
    """Splash wants [H, T, D], KV length / kv blocks multiples of 128 and a pre-scaled q."""
    hq, t, _ = q_hsd.shape
    if window is None:
        one = mask_lib.CausalMask((t, t))
    else:  # window keys including the query = (window - 1) to the left
        one = mask_lib.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    kernel = splash.make_splash_mha_single_device(
        mask_lib.MultiHeadMask([one] * hq),
        block_sizes=splash.BlockSizes.get_default(),
        interpret=True,
    )
    return kernel(q_hsd, k_hsd, v_hsd, sinks=sinks)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "window", [129, pytest.param(7, marks=_SLOW), pytest.param(None, marks=_SLOW)]
)
def test_matches_splash(window):
    """MiMo head dims (192 / 128), GQA 4:2, sinks: forward and all four gradients."""
    t, hq, hkv, dqk, dv = 256, 4, 2, 192, 128
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (1, t, hq, dqk))
    k = jax.random.normal(ks[1], (1, t, hkv, dqk))
    v = jax.random.normal(ks[2], (1, t, hkv, dv))
    sinks = jax.random.normal(ks[3], (hq,))
    do = jax.random.normal(ks[4], (1, t, hq, dv))
    scale = dqk**-0.5

    def ours(impl):
        def f(q, k, v, sinks):
            return attention(q, k, v, sinks=sinks, window=window, implementation=impl)
        return f

    def theirs(q, k, v, sinks):
        heads = lambda x: jnp.swapaxes(x[0], 0, 1)  # [1, T, H, D] -> [H, T, D]
        o_htd = _splash(heads(q) * scale, heads(k), heads(v), sinks, window)
        return jnp.swapaxes(o_htd, 0, 1)[None]

    want, want_vjp = jax.vjp(theirs, q, k, v, sinks)
    want_grads = want_vjp(do)
    tpu = lambda q, k, v, sinks: pallas_tpu_attention(
        q, k, v, sinks=sinks, window=window, q_segment_ids=None, kv_segment_ids=None,
        q_offset=jnp.int32(0), scale=scale, block_sizes=BlockSizes(128, 128), interpret=True)
    for f in (ours("xla"), tpu):
        got, vjp = jax.vjp(f, q, k, v, sinks)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
        for g, w in zip(vjp(do), want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
