"""A model in another compute/parameter dtype (e.g. a float32-trained model served in bf16)."""

from __future__ import annotations

from flax import nnx

from mimo_jax.core.dtypes import DTypeLike, canonical_dtype
from mimo_jax.model.fp8_linear import fp8_weights
from mimo_jax.model.mimo import MiMo
from mimo_jax.model.shapes import abstract_model


def with_dtype(model: MiMo, dtype: DTypeLike) -> MiMo:
    """A copy of `model` computing and storing parameters in `dtype` (any spelling: "bf16",
    jnp.bfloat16, ...). Parameters kept in float32 by design (router, correction bias) stay
    float32; shardings are kept. Its KV caches follow (`init_cache` uses `cfg.dtype`)."""
    if fp8_weights(model):
        raise ValueError("with_dtype: the model keeps FP8 weights; load it with the dtype "
                         "wanted instead (mimo_jax.load(path, dtype=..., keep_fp8=True))")
    dtype = canonical_dtype(dtype)
    cfg = model.cfg.replace(dtype=dtype, param_dtype=dtype)
    graphdef, target = nnx.split(abstract_model(cfg, remat=model.remat))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    flat = [(p, v.replace(source[p].get_value().astype(v.dtype)))
            for p, v in nnx.to_flat_state(target)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
