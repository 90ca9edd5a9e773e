# Sourced by demo.sh and test.sh: create (or reuse) the Python environment and activate it.
# The environment is cached per hash of pyproject.toml under ~/.cache/zseg, so a second run
# on the same machine skips the ~6 GB install (cellpose brings torch with its CUDA libraries).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
HASH="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-12)"
VENV="${ZSEG_VENV:-$HOME/.cache/zseg/venv-$HASH}"
if [ ! -f "$VENV/.zseg-ready" ]; then
    echo "zseg: creating the environment in $VENV (first time: about 5 minutes)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    touch "$VENV/.zseg-ready"
else
    # the package itself may have moved (a fresh clone): re-link it, no dependencies
    "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT" >/dev/null 2>&1 \
        || "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
fi
export PATH="$VENV/bin:$PATH"
# Nextflow (pinned in scripts/nextflow/pom.xml) from Maven Central, cached beside the venv
source "$ROOT/scripts/nextflow/install.sh"
