#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint, then the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-k8s-tools.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -m "not slow" "$@"
