#!/usr/bin/env bash
# The test suite: lint, then pytest. `--slow` runs only the slow-marked tests; other
# arguments go to pytest.
source "$(dirname "$0")/env.sh" test,dev,eval
marker="not slow"
if [ "${1:-}" = "--slow" ]; then marker="slow"; shift; fi
ruff check .
# Two workers: CI and the development machines have two cores.
exec python -m pytest -m "$marker" -p no:cacheprovider -n 2 "$@"
