"""Parallelism that needs the model: sharded creation, memory plans, multi-host start-up."""

from mimo_jax.parallel.distributed import maybe_initialize
from mimo_jax.parallel.placement import create_sharded
from mimo_jax.parallel.plan import (
    MemoryPlan,
    ServingPlan,
    format_plan,
    format_serving,
    plan_memory,
    plan_serving,
)

__all__ = ["MemoryPlan", "ServingPlan", "create_sharded", "format_plan", "format_serving",
           "maybe_initialize", "plan_memory", "plan_serving"]
