#!/usr/bin/env bash
# The test suite: lint, then pytest. `--slow` runs only the slow-marked tests; other
# arguments go to pytest.
source "$(dirname "$0")/env.sh" test,dev,eval
marker="not slow"
if [ "${1:-}" = "--slow" ]; then marker="slow"; shift; fi
ruff check .
exec python -m pytest -m "$marker" -p no:cacheprovider "$@"
