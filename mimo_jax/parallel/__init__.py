"""Parallelism that needs the model: sharded creation, memory plans, multi-host start-up."""

from mimo_jax.parallel.distributed import maybe_initialize
from mimo_jax.parallel.placement import create_sharded
from mimo_jax.parallel.plan import MemoryPlan, format_plan, plan_memory

__all__ = ["MemoryPlan", "create_sharded", "format_plan", "maybe_initialize", "plan_memory"]
