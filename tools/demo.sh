#!/usr/bin/env bash
# The main job: train a tiny MiMo on CPU, checkpoint it, and generate from it.
# Extra arguments go to `mimo-jax demo` (e.g. --minutes 2 --workdir runs/demo).
source "$(dirname "$0")/env.sh" ""  # no extras (a bare `source` would pass our arguments)
exec mimo-jax demo "$@"
