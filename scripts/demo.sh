#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), then run the whole pipeline on
# this machine (embedded broker + Redis, trained model, a real series replayed, alerts).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --speed 2000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m stream_detector demo "$@"
