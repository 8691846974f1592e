"""mimo-jax: MiMo-V2-Flash (hybrid sliding-window/global attention, sigmoid-routed MoE, MTP
heads) in JAX and Flax NNX.

The package is layered; each folder imports only from the ones before it (enforced by
`tests/test_import_graph.py`, order declared in `mimo_jax/layers.toml`... see `LAYERS` there):
core -> sharding -> model -> parallel -> checkpoint -> data -> inference -> train -> eval ->
commands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> defining module, imported on first use: `import mimo_jax` stays cheap, so
# the `mimo-jax` command starts (and re-executes itself with huge-page malloc, see
# mimo_jax.core.host_memory) without loading jax first.
_EXPORTS = {
    "AttentionSpec": "mimo_jax.model.config",
    "CheckpointError": "mimo_jax.core.errors",
    "GenerateOutput": "mimo_jax.inference",
    "MiMo": "mimo_jax.model.mimo",
    "ModelConfig": "mimo_jax.model.config",
    "ModelOutput": "mimo_jax.model.mimo",
    "ParamCount": "mimo_jax.model.shapes",
    "RouterOutput": "mimo_jax.model.moe",
    "abstract_model": "mimo_jax.model.shapes",
    "canonical_dtype": "mimo_jax.core.dtypes",
    "generate": "mimo_jax.inference",
    "load": "mimo_jax.checkpoint.loading",
    "param_count": "mimo_jax.model.shapes",
}
__all__ = [  # = sorted(_EXPORTS) (tested); a literal so that tools can read it
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mimo_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from mimo_jax.checkpoint.loading import load
    from mimo_jax.core.dtypes import canonical_dtype
    from mimo_jax.core.errors import CheckpointError
    from mimo_jax.inference import GenerateOutput, generate
    from mimo_jax.model.config import AttentionSpec, ModelConfig
    from mimo_jax.model.mimo import MiMo, ModelOutput
    from mimo_jax.model.moe import RouterOutput
    from mimo_jax.model.shapes import ParamCount, abstract_model, param_count
