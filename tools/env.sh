# Sourced by tools/demo.sh and tools/test.sh: make .venv (Python >= 3.11) and install the
# project with the pinned versions in constraints.txt. Usage: source tools/env.sh [EXTRAS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  py=""
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      py="$cand"; break
    fi
  done
  [ -n "$py" ] || { echo "mimo-jax needs Python >= 3.11 (3.11 for the pinned CI set)" >&2; exit 1; }
  "$py" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# Reinstall only when the requirements changed since the last install.
stamp=".venv/.mimo-jax-installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  # -qq: this machine's pip index config warns about every missing mirror folder.
  .venv/bin/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e "$spec"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
