"""Abstract shapes: the parameter tree without allocating it, and counts from it.

Init, loading, conversion, restore and memory plans all start from `abstract_model`, so the
model is described once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flax import nnx

from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import MiMo


def abstract_model(cfg: ModelConfig, **kwargs) -> MiMo:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes, dtypes and logical axes only."""
    return nnx.eval_shape(lambda: MiMo(cfg, rngs=nnx.Rngs(0), **kwargs))


class ParamCount(NamedTuple):
    total: int  # main model (no MTP heads)
    active: int  # per token: everything but the unchosen experts
    per_mtp_layer: int
    total_with_mtp: int


def param_count(cfg: ModelConfig) -> ParamCount:
    """Parameter counts from abstract shapes (nothing is allocated)."""
    model = abstract_model(cfg.replace(num_mtp_layers=1))
    main = mtp = experts = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(var.shape))
        if path[0] == "mtp":
            mtp += n
        else:
            main += n
            if path[-1] in ("gate_up", "down"):
                experts += n
    active = main - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return ParamCount(main, active, mtp, main + mtp * cfg.num_mtp_layers)
