#!/usr/bin/env bash
# The docker-compose deployment, for real: build the app image from ./Dockerfile, bring up the
# SuperLink and two SuperNodes of docker-compose.yml (TLS and SuperNode authentication on, as in
# the file), register the nodes' keys, run 2 rounds of simulations/smoke.toml with `flwr run`,
# read the run's metrics and adapter out of the SuperLink's volume, show that a SuperNode whose
# key is not registered is refused, and tear it all down.
#
# Offline-friendly: installs Debian's docker.io and docker-compose if missing, starts dockerd
# if no daemon answers (and stops only that one at the end), builds a stand-in for the
# Dockerfile's base image with debootstrap when it cannot be pulled, passes the host's extra CA
# certificates (TLS-intercepting proxy) and a local CPU torch wheel to the build as build args.
# All traffic stays on 127.0.0.1: the containers use the host's network (an override written
# below); nothing addresses Docker's bridge network.
#
# Usage (as root): bash scripts/compose_test.sh
#   COMPOSE_TEST_KEEP_IMAGES=1  keep the app image (fedtune:compose-test) and the base image
#   TORCH_WHEEL=/path/torch-2.13.0+cpu-...whl  the CPU torch wheel to build with (found if unset)
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T_START=$SECONDS
NICE=(nice -n 19)
BASE_IMAGE=python:3.11-slim          # the Dockerfile's FROM
PY=$ROOT/.venv/bin/python
FLWR=$ROOT/.venv/bin/flwr
FEDTUNE=$ROOT/.venv/bin/fedtune
CACHE=${COMPOSE_TEST_CACHE:-/var/cache/fedtune-compose-test}
ROOTFS=$CACHE/rootfs-bookworm
PROJECT=fedtunect$$
if [ "${COMPOSE_TEST_KEEP_IMAGES:-0}" = 1 ]; then APP_IMAGE=fedtune:compose-test; else APP_IMAGE=fedtune:compose-test-$$; fi
WORK=$(mktemp -d /tmp/fedtune-compose.XXXXXX)
DOCKERD_PID="" HTTP_PID="" BASE_IMPORTED=0 APP_BUILT=0 OK=0

say() { printf '[compose-test %4ds] %s\n' "$((SECONDS - T_START))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }
# exit 77: this machine cannot run a Docker engine at all (no root, no packages, no daemon); the
# caller decides whether that is a skip (CI prints it) or an error
no_engine() { say "NO DOCKER ENGINE: $*"; exit 77; }

cleanup() {
    local code=$?
    trap - EXIT INT TERM
    set +e
    if [ "$OK" != 1 ] && [ -n "${COMPOSE_UP:-}" ]; then
        say "logs of the deployment (last lines):"
        "${COMPOSE[@]}" logs --no-color --tail 40 2>&1 | tail -120
    fi
    say "teardown"
    if [ -n "${COMPOSE_UP:-}" ]; then
        "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1
        # one-off containers (docker-compose run) and volumes of this project only
        docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -f >/dev/null 2>&1
        docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker volume rm >/dev/null 2>&1
    fi
    if [ "$APP_BUILT" = 1 ] && [ "${COMPOSE_TEST_KEEP_IMAGES:-0}" != 1 ]; then
        docker rmi -f "$APP_IMAGE" >/dev/null 2>&1 && say "removed image $APP_IMAGE"
    fi
    if [ "$BASE_IMPORTED" = 1 ] && [ "${COMPOSE_TEST_KEEP_IMAGES:-0}" != 1 ]; then
        docker rmi -f "$BASE_IMAGE" >/dev/null 2>&1 && say "removed image $BASE_IMAGE (the debootstrap stand-in; its root stays cached in $ROOTFS)"
    fi
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        say "stopped the dockerd this test started (pid $DOCKERD_PID)"
    fi
    rm -rf "$WORK"
    say "total $((SECONDS - T_START)) s; exit $code"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- (a) Docker and a daemon
[ -x "$PY" ] || fail "no .venv: run scripts/setup.sh first"
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || no_engine "docker.io, docker-compose and debootstrap are missing and this is not root"
    say "installing docker.io docker-compose debootstrap (apt)"
    "${NICE[@]}" apt-get update -q >/dev/null || no_engine "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -q docker.io docker-compose debootstrap >/dev/null \
        || no_engine "apt-get install docker.io docker-compose debootstrap failed"
fi
if ! docker info >/dev/null 2>&1; then
    say "no Docker daemon answers: starting dockerd (log /tmp/fedtune-compose-dockerd.log)"
    "${NICE[@]}" dockerd >/tmp/fedtune-compose-dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 /tmp/fedtune-compose-dockerd.log; no_engine "dockerd did not come up"; }
fi
say "docker $(docker version --format '{{.Server.Version}}') (daemon), $(docker-compose version --short) (compose)"

# ---------------------------------------------------------------- (b) the base image
T0=$SECONDS
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE is here already"
elif timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    say "pulled $BASE_IMAGE"
else
    say "$BASE_IMAGE cannot be pulled: building a stand-in from Debian bookworm with debootstrap"
    if [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
        mkdir -p "$CACHE"
        rm -rf "$ROOTFS.tmp"
        "${NICE[@]}" debootstrap --variant=minbase --include=python3.11,python3-venv,python3-pip,ca-certificates \
            bookworm "$ROOTFS.tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; fail "debootstrap"; }
        mv "$ROOTFS.tmp" "$ROOTFS"
    else
        say "debootstrap root cached in $ROOTFS"
    fi
    "${NICE[@]}" tar -C "$ROOTFS" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' -c . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
              --change 'LABEL org.fedtune.offline-base=debootstrap-bookworm' - "$BASE_IMAGE" >/dev/null
    BASE_IMPORTED=1
fi
T_BASE=$((SECONDS - T0))
say "base image ready: ${T_BASE} s"

# ---------------------------------------------------------------- (c) the app image
BUILD_ARGS=()
# CA certificates the host trusts and the base image does not (a TLS-intercepting proxy's)
docker run --rm --network none "$BASE_IMAGE" cat /etc/ssl/certs/ca-certificates.crt >"$WORK/base-ca.crt" 2>/dev/null || true
"$PY" - "$WORK/base-ca.crt" /etc/ssl/certs/ca-certificates.crt >"$WORK/extra-ca.crt" <<'EOF'
import re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
base = {" ".join(c.split()) for c in pem.findall(open(sys.argv[1]).read())}
extra = [c for c in pem.findall(open(sys.argv[2]).read()) if " ".join(c.split()) not in base]
print("\n".join(extra))
EOF
if [ -s "$WORK/extra-ca.crt" ] && grep -q BEGIN "$WORK/extra-ca.crt"; then
    say "passing $(grep -c BEGIN "$WORK/extra-ca.crt") CA certificate(s) the base image lacks (EXTRA_CA_CERTS)"
    BUILD_ARGS+=(--build-arg "EXTRA_CA_CERTS=$(cat "$WORK/extra-ca.crt")")
fi
# the CPU torch wheel from local disk, served on 127.0.0.1 for the build's pip
if [ -z "${TORCH_WHEEL:-}" ]; then
    for d in ${PIP_FIND_LINKS:-} $("$PY" -m pip config get global.find-links 2>/dev/null) /opt/wheels; do
        d=${d#file://}
        [ -d "$d" ] && TORCH_WHEEL=$(ls "$d"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1) && [ -n "$TORCH_WHEEL" ] && break
    done
fi
if [ -z "${TORCH_WHEEL:-}" ]; then
    TORCH_WHEEL=$(timeout 120 find / -xdev -name 'torch-2.13.0+cpu-cp311-*.whl' -print -quit 2>/dev/null || true)
fi
if [ -n "${TORCH_WHEEL:-}" ] && [ -f "$TORCH_WHEEL" ]; then
    mkdir -p "$WORK/wheels" && ln -s "$TORCH_WHEEL" "$WORK/wheels/"
    HTTP_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$HTTP_PORT" >"$WORK/http.log" 2>&1 &
    HTTP_PID=$!
    say "torch: $(basename "$TORCH_WHEEL") served on 127.0.0.1:$HTTP_PORT for the build"
    BUILD_ARGS+=(--build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:$HTTP_PORT/ --trusted-host 127.0.0.1")
else
    say "no local CPU torch wheel: the build uses the Dockerfile's default (PyTorch's CPU index)"
fi
T0=$SECONDS
say "building $APP_IMAGE from ./Dockerfile (--network host)"
DOCKER_BUILDKIT=0 "${NICE[@]}" docker build --force-rm --network host -t "$APP_IMAGE" "${BUILD_ARGS[@]}" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "docker build"; }
APP_BUILT=1
T_APP=$((SECONDS - T0))
say "app image built: ${T_APP} s ($(docker image inspect -f '{{.Size}}' "$APP_IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
[ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null && HTTP_PID=""
docker run --rm --network none "$APP_IMAGE" python -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__); assert "+cpu" in torch.__version__ or not torch.version.cuda'

# ---------------------------------------------------------------- (d) the deployment
# Certificates and keys exactly as a user makes them; the container user (uid 49999) must be able
# to read the private keys mounted into its container (compose bind-mounts them with host owner and mode).
"$FEDTUNE" certs "$WORK/certificates" --nodes 3 >/dev/null
chown 49999:49999 "$WORK/certificates/server.key" "$WORK"/certificates/keys/supernode-?
say "certificates and 3 SuperNode key pairs in a temp dir; private keys $(stat -c '%a %u' "$WORK/certificates/server.key") (mode, owner)"
export FEDTUNE_IMAGE=$APP_IMAGE FEDTUNE_CERTS=$WORK/certificates

# Host networking on 127.0.0.1: docker-compose.yml as it is (image, TLS and auth flags, secrets,
# volume), with each service on the host's network instead of the bridge, its addresses moved to
# loopback and free ports (the SuperNodes' runtime APIs need one each once they share a network),
# and no published ports (meaningless on the host network). An override file cannot drop `ports`
# in Compose 1.29, so this is the whole file, rewritten.
read -r LINK_PORT NODE0_PORT NODE1_PORT NODE2_PORT < <("$PY" -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
"$PY" - "$ROOT/docker-compose.yml" "$WORK/docker-compose.host-network.yml" "$LINK_PORT" "$NODE0_PORT" "$NODE1_PORT" "$NODE2_PORT" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
link_port, node_ports = sys.argv[3], sys.argv[4:]
def moved(cmd, port):
    out = []
    for prev, arg in zip([None, *cmd], cmd):
        if prev == "--host":
            arg = "127.0.0.1"
        elif prev == "--port":
            arg = port
        elif prev == "--superlink":
            arg = f"127.0.0.1:{link_port}"
        out.append(arg)
    return out
for name, svc in doc["services"].items():
    port = link_port if name == "superlink" else node_ports[int(name.rsplit("-", 1)[1])]
    svc.pop("ports", None)
    svc["network_mode"] = "host"
    svc["command"] = moved(svc["command"], port)
open(sys.argv[2], "w").write(yaml.safe_dump(doc, sort_keys=False))
EOF
COMPOSE=(docker-compose -p "$PROJECT" --project-directory "$ROOT" -f "$WORK/docker-compose.host-network.yml")
COMPOSE_UP=1
"${COMPOSE[@]}" config -q || fail "docker-compose config"
! grep -q -- "--insecure" "$ROOT/docker-compose.yml" || fail "docker-compose.yml is not secure by default"

mkdir -p "$WORK/flwr-home"
cat >"$WORK/flwr-home/config.toml" <<EOF
[superlink]
default = "compose-test"

[superlink.compose-test]
address = "127.0.0.1:$LINK_PORT"
root-certificates = "$WORK/certificates/ca.crt"
EOF
flwr() { (cd "$ROOT" && FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 "$FLWR" "$@"); }

say "docker-compose up superlink (TLS, SuperNode auth) on 127.0.0.1:$LINK_PORT"
"${COMPOSE[@]}" up -d --no-build superlink 2>&1 | sed 's/^/    /'
for _ in $(seq 120); do "$PY" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$LINK_PORT)))" && break; sleep 0.5; done
LISTEN=$(ss -ltnH "sport = :$LINK_PORT" 2>/dev/null | awk '{print $4}' | sort -u | tr '\n' ' ')
say "SuperLink listening on: ${LISTEN:-?}"
case "$LISTEN" in *127.0.0.1:$LINK_PORT*) ;; *) fail "SuperLink is not listening on 127.0.0.1:$LINK_PORT";; esac
for bad in $LISTEN; do case "$bad" in 127.0.0.1:*) ;; *) fail "SuperLink listens beyond loopback: $bad";; esac; done

for i in 0 1; do
    out=$(flwr supernode register "$WORK/certificates/keys/supernode-$i.pub" compose-test --format json) \
        || fail "registering supernode-$i: $out"
    say "registered supernode-$i's public key"
done
"${COMPOSE[@]}" up -d --no-build --no-deps supernode-0 supernode-1 2>&1 | sed 's/^/    /'
for _ in $(seq 90); do
    n=$(flwr supernode list compose-test --format json 2>/dev/null | "$PY" -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin)["nodes"] if "online" in str(n.get("status","")).lower()))' 2>/dev/null || echo 0)
    [ "$n" -ge 2 ] && break
    sleep 1
done
say "SuperNodes online: ${n:-0}"
[ "${n:-0}" -ge 2 ] || { flwr supernode list compose-test --format json; fail "the SuperNodes did not come online"; }

RUN_CONFIG='experiment="simulations/smoke.toml" overrides="federation.num_clients=2" out-dir="/app/state/runs/smoke" resume=false'
T0=$SECONDS
out=$(flwr run . compose-test --run-config "$RUN_CONFIG" --format json) || fail "flwr run: $out"
RUN_ID=$(printf '%s' "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["run-id"])') || fail "flwr run: $out"
say "flwr run: run $RUN_ID submitted (smoke.toml, 2 rounds, 2 SuperNodes)"
STATUS=unknown
while [ $((SECONDS - T0)) -lt 900 ]; do
    STATUS=$(flwr ls compose-test --run-id "$RUN_ID" --format json 2>/dev/null \
             | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["runs"]; print(r[0]["status"] if r else "unknown")' 2>/dev/null || echo unknown)
    case "$STATUS" in finished*) break;; esac
    sleep 3
done
T_RUN=$((SECONDS - T0))
say "run $RUN_ID: $STATUS after ${T_RUN} s"
[ "$STATUS" = "finished:completed" ] || fail "run status $STATUS"

# the run's outputs, read out of the SuperLink's volume as a user would
VOLUME=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | grep superlink-state)
mkdir -p "$WORK/out"
docker run --rm --network none -v "$VOLUME:/app/state:ro" "$APP_IMAGE" tar -C /app/state/runs -cf - smoke \
    | tar -C "$WORK/out" -xf -
say "copied runs/smoke out of volume $VOLUME: $(cd "$WORK/out/smoke" && ls | tr '\n' ' ')"
"$PY" - "$WORK/out/smoke" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
assert [r["round"] for r in records] == [0, 1, 2], [r["round"] for r in records]
for r in records[1:]:
    statuses = [c["status"] for c in r["clients"]]
    assert statuses == ["ok", "ok"], statuses
adapter = out / "adapter"
assert (adapter / "adapter_config.json").is_file(), sorted(p.name for p in adapter.iterdir())
weights = [p for p in adapter.iterdir() if p.suffix in (".safetensors", ".bin")]
assert weights and all(p.stat().st_size > 0 for p in weights), sorted(p.name for p in adapter.iterdir())
t = [r["wall_time_s"] for r in records]
metric = next((k for k in ("accuracy", "eval_accuracy", "loss", "eval_loss") if k in records[-1]), None)
for r, prev in zip(records[1:], t):
    extra = f", {metric} {r[metric]:.4f}" if metric else ""
    print(f"    round {r['round']}: {r['wall_time_s'] - prev:.1f} s{extra}")
print(f"    metrics.jsonl: rounds {[r['round'] for r in records]}, clients ok; adapter: "
      + ", ".join(f"{p.name} ({p.stat().st_size} B)" for p in sorted(adapter.iterdir())))
EOF

# a SuperNode whose key is not registered (supernode-2 of the same file) is refused
say "starting supernode-2, whose key was never registered"
set +e
timeout 180 "${COMPOSE[@]}" run --rm --no-deps -T supernode-2 >"$WORK/intruder.log" 2>&1
rc=$?
set -e
grep -m1 -i "failed to activate\|not registered\|denied\|unauth" "$WORK/intruder.log" | sed 's/^/    /' || true
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { tail -20 "$WORK/intruder.log"; fail "the unregistered SuperNode was not refused (rc $rc)"; }
grep -q "Failed to activate SuperNode" "$WORK/intruder.log" || { tail -20 "$WORK/intruder.log"; fail "no refusal in its log"; }
n=$(flwr supernode list compose-test --format json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))')
say "unregistered SuperNode refused (exit $rc); the federation still has $n nodes"
[ "$n" = 2 ] || fail "expected 2 nodes, found $n"

OK=1
say "PASSED: base image ${T_BASE} s, app image ${T_APP} s, run ${T_RUN} s (2 rounds), total $((SECONDS - T_START)) s"
