#!/usr/bin/env bash
# Offline deployment checks (issue 9): installs the validators it needs, then runs
# tests/deploy. Idempotent: a tool already present is not installed again.
#   Debian: docker-compose (1.29, `docker-compose config`), prometheus (server + promtool).
#   kubectl must provide `kubectl kustomize` (Debian's kubernetes-client 1.20 is too old for
#   this; the CI image ships kubectl). PyPI: kubernetes-validate, into the project venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "deploy-check: installing ${missing[*]} (apt-get)"
    # Not fatal: without a package index the tests that need these tools skip, saying why.
    { $SUDO apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            $(printf '%s\n' "${missing[@]}" | sort -u); } \
        || echo "deploy-check: could not install ${missing[*]}; their tests will skip" >&2
fi
# The Debian package enables a prometheus service; nothing here starts it (no systemd), and
# the tests run their own on a free loopback port.
if ! command -v kubectl >/dev/null 2>&1; then
    echo "deploy-check: kubectl not found; the Kustomize tests will skip" >&2
fi
"$PY" -c "import kubernetes_validate" 2>/dev/null \
    || "$PY" -m pip install --quiet "kubernetes-validate>=1.31" \
    || echo "deploy-check: kubernetes-validate not installed; its tests will skip" >&2

exec "$PY" -m pytest -q -p no:cacheprovider tests/deploy "$@"
