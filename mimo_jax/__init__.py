"""mimo-jax: MiMo-V2-Flash (hybrid sliding-window/global attention, sigmoid-routed MoE, MTP
heads) in JAX and Flax NNX.

The package is layered; each folder imports only from the ones before it (enforced by
`tests/test_import_graph.py`, order declared in `mimo_jax/layers.toml`... see `LAYERS` there):
core -> sharding -> model -> parallel -> checkpoint -> data -> inference -> train -> eval ->
commands.
"""

from mimo_jax.checkpoint.loading import load
from mimo_jax.core.dtypes import canonical_dtype
from mimo_jax.core.errors import CheckpointError
from mimo_jax.inference import GenerateOutput, generate
from mimo_jax.model.config import AttentionSpec, ModelConfig
from mimo_jax.model.mimo import MiMo, ModelOutput
from mimo_jax.model.moe import RouterOutput
from mimo_jax.model.shapes import ParamCount, abstract_model, param_count

__all__ = [
    "AttentionSpec",
    "CheckpointError",
    "GenerateOutput",
    "MiMo",
    "ModelConfig",
    "ModelOutput",
    "ParamCount",
    "RouterOutput",
    "abstract_model",
    "canonical_dtype",
    "generate",
    "load",
    "param_count",
]
