"""Generation in bfloat16 (the release's dtype): a tiny model trained here for a few seconds on
periodic sequences (confident predictions: clear logit margins) generates the same greedy
tokens in bf16 as in float32, plain and speculative, and its KV caches are bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_generate import small_cfg

from mimo_jax import MiMo
from mimo_jax.inference import generate, init_cache, with_dtype
from mimo_jax.inference.generate import new_cache

PERIODS = [[int(x) for x in np.random.default_rng(s).integers(1, 64, n)]
           for s, n in ((0, 13), (1, 7), (2, 10))]


@pytest.fixture(scope="module")
def trained() -> MiMo:
    model = MiMo(small_cfg(), rngs=nnx.Rngs(1))
    rows = [(p * 20)[i : i + 40] for p in PERIODS for i in range(3)]
    data = jnp.asarray(rows)
    opt = nnx.Optimizer(model, optax.adam(5e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids):
        def loss_fn(model):
            out = model(ids)
            lp = jax.nn.log_softmax(out.logits[:, :-1])
            loss = -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))
            for k in range(out.mtp_logits.shape[0]):
                lq = jax.nn.log_softmax(out.mtp_logits[k, :, : -(k + 2)])
                loss -= 0.3 * jnp.mean(jnp.take_along_axis(lq, ids[:, k + 2 :, None], -1))
            return loss

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(80):
        loss = step(model, opt, data)
    assert float(loss) < 1.0, float(loss)
    return model


def test_bf16_greedy_tokens_equal_float32(trained):
    bf16 = with_dtype(trained, "bf16")
    assert bf16.cfg.dtype == "bfloat16"
    assert bf16.embed[...].dtype == jnp.bfloat16
    routers = [v for p, v in nnx.to_flat_state(nnx.state(bf16)) if p[-1] == "router"]
    assert routers and all(v.get_value().dtype == jnp.float32 for v in routers)  # kept f32
    prompts = [p[:6] for p in PERIODS] + [PERIODS[0] * 2]
    f32 = generate(trained, prompts, max_new_tokens=24)
    # The float32 model is confident: the runner-up is far behind at every step.
    out = generate(bf16, prompts, max_new_tokens=24)
    assert out.tokens == f32.tokens
    spec = generate(bf16, prompts, max_new_tokens=24, speculative=3)
    assert spec.tokens == f32.tokens
    assert spec.acceptance_length > 2.0  # trained heads draft well, in bf16 too


def test_bf16_kv_cache(trained):
    bf16 = with_dtype(trained, jnp.bfloat16)
    cache = init_cache(bf16.cfg, 2, 32, mtp_heads=2)
    arrays = [x for layer in (*cache.prefix, *cache.blocks, *cache.mtp) for x in layer]
    assert all(x.dtype == jnp.bfloat16 for x in arrays)
    assert new_cache(bf16.cfg, 2, 32, 2, None).blocks[0].k.dtype == jnp.bfloat16
    f32 = init_cache(trained.cfg, 2, 32, mtp_heads=2)
    assert sum(x.nbytes for x in arrays) * 2 == sum(
        x.nbytes for layer in (*f32.prefix, *f32.blocks, *f32.mtp) for x in layer)
