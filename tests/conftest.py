"""Test session setup: 8 simulated CPU devices for the multi-device tests.

XLA reads the flag when jax first initialises its backend, so it is set before anything
imports jax.
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
