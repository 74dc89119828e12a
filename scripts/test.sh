#!/usr/bin/env bash
# Install (first run only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" requirements-dev.txt
cd "$ROOT"
python -m pytest -q tests "$@"
