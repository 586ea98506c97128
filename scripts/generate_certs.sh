#!/usr/bin/env bash
# Certificates for a TLS deployment (with-tls.yml): a CA, the SuperLink's certificate for the
# host names below, and one SuperNode authentication key pair per node, in ./certificates
# (git-ignored; private keys mode 0600). Usage: scripts/generate_certs.sh [NODES] [EXTRA_HOST ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES="${1:-3}"; shift || true
HOSTS=()
for h in "$@"; do HOSTS+=(--host "$h"); done
.venv/bin/fedtune certs certificates --nodes "$NODES" "${HOSTS[@]}"
