"""Multi-host start-up: call `jax.distributed.initialize()` when this process is one of many.

On TPU pod slices, SLURM and Open MPI jobs jax discovers the coordinator itself; elsewhere set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (multi-process GPU).
"""

from __future__ import annotations

import os

import jax

# Environment variables that say "you are one process of several".
_MULTI_PROCESS_HINTS = {
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # set on every host of a multi-host TPU slice
    "MEGASCALE_NUM_SLICES": lambda v: v not in ("", "1"),
    "SLURM_NTASKS": lambda v: v not in ("", "1"),
    "OMPI_COMM_WORLD_SIZE": lambda v: v not in ("", "1"),
}
_initialized = False


def is_multi_process_environment(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(check(env[name]) for name, check in _MULTI_PROCESS_HINTS.items() if name in env)


def maybe_initialize() -> bool:
    """Initialise jax's distributed runtime once if the environment asks for it.

    Must run before anything touches jax devices. Returns True when running multi-process.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    if is_multi_process_environment():
        kwargs = {}
        if "JAX_COORDINATOR_ADDRESS" in os.environ:
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
    _initialized = True
    return jax.process_count() > 1
