#!/usr/bin/env bash
# Certificates for a TLS deployment (docker-compose.yml, or `fedtune deploy` on real machines): a
# CA (ca.crt, and ca.key to sign more later: keep it offline), the SuperLink's certificate for the
# host names below, and one SuperNode authentication key pair per node, in ./certificates
# (git-ignored and docker-ignored; private keys mode 0600, written atomically, never through a
# symlink). Usage: scripts/generate_certs.sh [NODES] [EXTRA_HOST ...]
#
# docker-compose.yml mounts the private keys into containers that run as uid 49999, with the
# host file's owner and mode (Compose bind-mounts file secrets), so give them to that uid:
#   sudo chown 49999:49999 certificates/server.key certificates/keys/supernode-*
# (run as root, this script does it; the public files stay readable by everyone).
set -euo pipefail
cd "$(dirname "$0")/.."
NODES="${1:-3}"; shift || true
HOSTS=()
for h in "$@"; do HOSTS+=(--host "$h"); done
.venv/bin/fedtune certs certificates --nodes "$NODES" "${HOSTS[@]}"
if [ "$(id -u)" = 0 ]; then
    chown 49999:49999 certificates/server.key certificates/keys/supernode-*[0-9]
    echo "[fedtune] private keys handed to uid 49999 (the containers' user)"
else
    echo "[fedtune] for docker-compose: sudo chown 49999:49999 certificates/server.key certificates/keys/supernode-*[0-9]"
fi
