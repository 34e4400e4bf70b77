#!/usr/bin/env bash
# Run the test suite (CPU, real multi-process gloo ranks). Extra arguments go to pytest.
#   bash scripts/test.sh            # CI: the fast suite
#   bash scripts/test.sh -m slow    # the slow checks
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
exec "$PY" -m pytest -q "$@"
