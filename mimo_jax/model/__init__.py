"""The model: config, layers, attention, MoE, the MiMo stack with MTP heads, abstract shapes.

Imports only `mimo_jax.core`, `mimo_jax.sharding` (the rules it annotates with) and
`pallas_kernels`; nothing here knows about checkpoints, training or inference.
"""

from mimo_jax.model.config import AttentionSpec, ModelConfig
from mimo_jax.model.mimo import MiMo, ModelOutput
from mimo_jax.model.moe import RouterOutput
from mimo_jax.model.shapes import ParamCount, abstract_model, param_count

__all__ = [
    "AttentionSpec",
    "MiMo",
    "ModelConfig",
    "ModelOutput",
    "ParamCount",
    "RouterOutput",
    "abstract_model",
    "param_count",
]
