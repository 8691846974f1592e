"""Test session setup: 8 simulated CPU devices for the multi-device tests.

XLA reads the flag when jax first initialises its backend, so it is set before anything
imports jax.
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Property tests are reproducible in CI: the same examples on every run (a red build reruns
# identically, no example database), with the failing example's reproduction blob printed.
# Locally hypothesis keeps exploring new examples. `CI` is set by GitHub Actions and most CI
# systems; `HYPOTHESIS_PROFILE=mimo-ci` selects the profile by hand.
from hypothesis import settings  # noqa: E402

settings.register_profile("mimo-ci", derandomize=True, database=None, print_blob=True,
                          deadline=None)
_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("mimo-ci" if os.environ.get("CI") else None)
if _profile:
    settings.load_profile(_profile)
