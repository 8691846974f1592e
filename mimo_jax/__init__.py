"""mimo-jax: MiMo-V2-Flash (hybrid sliding-window/global attention, sigmoid-routed MoE, MTP
heads) in JAX and Flax NNX."""

from mimo_jax.config import AttentionSpec, ModelConfig
from mimo_jax.inference import GenerateOutput, generate
from mimo_jax.loading import ParamCount, abstract_model, load, param_count
from mimo_jax.model import MiMo, ModelOutput
from mimo_jax.moe import RouterOutput
from mimo_jax.safetensors_io import CheckpointError

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
    "generate",
    "load",
    "param_count",
]
