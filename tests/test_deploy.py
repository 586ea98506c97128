"""Deployment: certificates and node keys, the compose files (validated statically here; the
real Docker run is scripts/compose_test.sh, marked ``docker``), the stop path, and the same
topology as real processes on 127.0.0.1 with TLS and SuperNode auth."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedtune.core.config import load_config
from fedtune.deploy import certificates
from fedtune.deploy.certificates import (
    generate_certificates,
    generate_node_keys,
    write_secret,
)
from fedtune.deploy.compose import (
    CONTAINER_UID,
    FLWR_VERSION,
    SUPERLINK_PORT,
    compose_files,
)
from fedtune.deploy.processes import (
    LocalDeployment,
    NodeSpec,
    is_worker_process,
    node_specs,
)
from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)


def test_certificates_chain_to_the_ca_and_keys_are_private(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    paths = generate_certificates(tmp_path, ("127.0.0.1", "localhost", "superlink", "node.example"))
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node.example" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for secret in (paths["key"], paths["ca_key"]):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    private, public = generate_node_keys(tmp_path / "keys", ["n0"])["n0"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"


def test_node_config_carries_partition_and_device_as_flower_parses_it():
    from flwr.common.config import parse_config_args

    cfg = load_config(ROOT / "simulations" / "deploy.toml")
    specs = node_specs(cfg, 3)
    parsed = [parse_config_args([s.node_config()]) for s in specs]
    assert parsed[1] == {"partition-id": 1, "num-partitions": 3, "device": "jetson-xavier-nx", "client-worker": True}
    assert [p["device"] for p in parsed] == ["jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier"]


def test_private_keys_are_written_0600_never_through_a_symlink_and_only_to_a_fresh_file(tmp_path, monkeypatch):
    old = os.umask(0)  # a permissive umask must not widen the mode
    try:
        key = tmp_path / "keys" / "node.key"
        write_secret(key, b"secret-1")
        assert key.read_bytes() == b"secret-1" and stat.S_IMODE(key.stat().st_mode) == 0o600
        key.chmod(0o644)  # rewriting replaces the file (a fresh inode, mode 0600), it does not reuse it
        write_secret(key, b"secret-2")
        assert key.read_bytes() == b"secret-2" and stat.S_IMODE(key.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    # a symlink where the key goes is refused, and its target is left alone
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    link = tmp_path / "link.key"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symlink"):
        write_secret(link, b"secret")
    assert victim.read_text() == "not yours" and link.is_symlink()
    # the temporary name is created with O_EXCL | O_NOFOLLOW: something already there (here a
    # symlink planted under the name it will pick) makes it fail instead of writing through it
    monkeypatch.setattr(certificates.secrets, "token_hex", lambda n: "planted")
    planted = tmp_path / ".other.key.planted.tmp"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_secret(tmp_path / "other.key", b"secret")
    assert victim.read_text() == "not yours" and not (tmp_path / "other.key").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.key.planted.tmp", "keys", "link.key", "victim"]


def test_a_deployment_keeps_its_secrets_out_of_its_directory_and_removes_them(tmp_path):
    paths = generate_certificates(tmp_path / "throwaway", keep_ca_key=False)
    assert "ca_key" not in paths and not (tmp_path / "throwaway" / "ca.key").exists()
    dep = LocalDeployment(tmp_path / "run" / "deployment", [])
    secrets_dir = dep.secrets
    assert not secrets_dir.is_relative_to(tmp_path / "run")
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    private, _ = generate_node_keys(secrets_dir / "keys", ["n0"])["n0"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    dep.stop()
    assert not secrets_dir.exists()


def _sleeper(*extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_stop_kills_only_the_workers_it_started(tmp_path):
    """A pid file may be stale: its pid reused by some other process. stop() reads
    /proc/PID/cmdline and signals only this deployment's worker for that pid file."""
    dep = LocalDeployment(tmp_path / "dep", [])
    workers = dep.work_dir / "workers"
    workers.mkdir(parents=True)
    worker = _sleeper("-m", "clients.worker", "--socket", str(workers / "node-1-abc.sock"), "--idle-timeout", "5")
    stranger = _sleeper()  # the pid of a stale pid file, reused by an unrelated process
    other_worker = _sleeper("-m", "clients.worker", "--socket", str(tmp_path / "elsewhere" / "node-2-abc.sock"))
    try:
        deadline = time.time() + 10  # until the children have exec'd (their cmdline is final)
        while time.time() < deadline and b"--socket" not in Path(f"/proc/{worker.pid}/cmdline").read_bytes():
            time.sleep(0.05)
        (workers / "node-1-abc.pid").write_text(str(worker.pid))
        (workers / "node-0-abc.pid").write_text(str(stranger.pid))
        (workers / "node-2-abc.pid").write_text(str(other_worker.pid))
        (workers / "node-3-abc.pid").write_text("not a pid")
        (workers / "node-4-abc.pid").write_text("1")
        assert is_worker_process(worker.pid, workers / "node-1-abc.pid")
        assert not is_worker_process(stranger.pid, workers / "node-0-abc.pid")
        assert not is_worker_process(other_worker.pid, workers / "node-2-abc.pid")
        dep.stop()
        assert worker.wait(timeout=10) == -signal.SIGTERM
        time.sleep(0.3)
        assert stranger.poll() is None and other_worker.poll() is None
    finally:
        for proc in (worker, stranger, other_worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _default(value: str) -> str:
    """A compose value with every ${VAR:-default} as Compose reads it when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_is_secure_by_default_and_publishes_on_loopback():
    secure, insecure = (yaml.safe_load((ROOT / name).read_text()) for name in ("docker-compose.yml", "insecure.yml"))
    for name, svc in secure["services"].items():
        cmd = svc["command"]
        assert "--insecure" not in cmd, name
        if name == "superlink":
            assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"} <= set(cmd)
        else:
            assert "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd
            # each SuperNode sees the CA and its own key, nobody else's
            assert {s["target"] for s in svc["secrets"]} == {"/app/certificates/ca.crt", f"/app/keys/{name}"}
            assert "ports" not in svc
    for doc in (secure, insecure):
        published = [p for svc in doc["services"].values() for p in svc.get("ports", [])]
        assert published and all(_default(p) == f"127.0.0.1:{SUPERLINK_PORT}:{SUPERLINK_PORT}" for p in published)
    assert all("--insecure" in svc["command"] for svc in insecure["services"].values())
    assert "secrets" not in insecure  # the insecure variant stands alone: no certificates needed
    assert not (ROOT / "with-tls.yml").exists()
    # the container user is the one the mounted keys must be readable by
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"--uid {CONTAINER_UID} app" in dockerfile and "\nUSER app\n" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"certificates", ".venv", "runs", "*.key"} <= set(ignored)  # no secrets in a build context


@pytest.mark.docker
def test_the_compose_deployment_for_real(request):
    """scripts/compose_test.sh: build the image, bring up docker-compose.yml (TLS, SuperNode auth)
    on 127.0.0.1, run 2 rounds, refuse an unregistered SuperNode. Needs root and Docker's packages.
    Only on request (``-m docker``): another ``-m`` replaces the default ``-m 'not docker'``."""
    if not re.search(r"(?<!not )\bdocker\b", request.config.getoption("markexpr") or ""):
        pytest.skip("the real Docker deployment runs only with -m docker (or: bash scripts/compose_test.sh)")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "compose_test.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def _validate(*paths):
    return subprocess.run([f"{BIN}/check-jsonschema", "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_compose_files_are_valid_and_match_the_generator(tmp_path):
    files = [ROOT / "docker-compose.yml", ROOT / "insecure.yml"]
    proc = _validate(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "bad.yml"  # the validator does reject a malformed file
    bad.write_text("services:\n  superlink:\n    image: x\n    ports: 9093\n    restart: sometimes\n")
    assert _validate(bad).returncode != 0
    base, insecure = (yaml.safe_load(p.read_text()) for p in files)
    cfg = load_config(ROOT / "simulations" / "deploy.toml")
    assert (base, insecure) == compose_files(node_specs(cfg, 3)), "regenerate: fedtune compose --config" \
        " simulations/deploy.toml --nodes 3"
    nodes = [s for s in base["services"] if s.startswith("supernode-")]
    assert len(nodes) == 3
    for svc in base["services"].values():
        assert svc["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION
    import flwr

    assert flwr.__version__ == FLWR_VERSION  # the image pins the version the tests run
    configs = [base["services"][n]["command"][base["services"][n]["command"].index("--node-config") + 1]
               for n in nodes]
    assert [c.split()[0] for c in configs] == ["partition-id=0", "partition-id=1", "partition-id=2"]
    assert all("device=" in c for c in configs)
    link = base["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--insecure" not in link and "--ssl-certfile" in link
    for n in nodes:
        cmd = base["services"][n]["command"]
        assert "--insecure" not in cmd and "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd
    # every secret file is one `fedtune certs certificates` writes (FEDTUNE_CERTS moves the directory)
    written = {"ca.crt", "server.pem", "server.key"} | {f"keys/supernode-{i}" for i in range(3)}
    assert {_default(s["file"]).removeprefix("./certificates/") for s in base["secrets"].values()} == written
    assert "certificates/" in (ROOT / ".gitignore").read_text()


@pytest.mark.integration
def test_an_unregistered_supernode_is_refused(tmp_path):
    with LocalDeployment(tmp_path / "dep", []) as dep:
        dep.start_supernode("member", NodeSpec(0, 1))
        intruder = dep.start_supernode("intruder", NodeSpec(1, 2), register=False)
        intruder.wait(timeout=120)
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in dep.log("intruder")
        nodes = json.loads(dep.flwr("supernode", "list", dep.connection, "--format", "json").stdout)["nodes"]
        assert len(nodes) == 1 and dep.keys["member"][1].exists()
        assert dep.procs["member"].poll() is None  # the registered node stays connected


@pytest.mark.integration
def test_fedtune_deploy_three_supernodes_with_tls_survives_a_crashing_client(tmp_path):
    """`fedtune deploy`: SuperLink + 3 SuperNodes as processes, TLS and auth on; client 2's
    process dies in round 1; the run still finishes:completed (read from Flower)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a relative --out, as in the README: the ServerApp, which runs from its installed app folder, still
    # finds the experiment file and writes to the run directory
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune", "deploy", "--config", str(ROOT / "simulations" / "deploy.toml"),
         "--out", "run", "--set", 'faults.clients.2="crash"', "--set", "faults.rounds=[1]",
         "--set", "federation.round_timeout_s=45"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(TLS on, SuperNode auth on," in proc.stdout and ": finished:completed" in proc.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    first = {c["client_id"]: c for c in records[1]["clients"]}
    assert first[2]["status"] == "failed" and first[0]["status"] == first[1]["status"] == "ok"
    assert [c["status"] for c in records[2]["clients"]] == ["ok"] * 3
    assert {c["device"] for c in records[2]["clients"]} == {"jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    # each node's persistent worker kept the model and data loaded: no setup in round 2 for the
    # clients that trained in round 1 (client 2 crashed before loading anything), and the fresh
    # ClientApp process Flower starts per message reported its age
    second = {c["client_id"]: c for c in records[2]["clients"]}
    assert second[0]["setup_s"] < 0.05 and second[1]["setup_s"] < 0.05, second
    assert all(c["process_s"] > 0 for c in second.values())
    logs = out / "deployment" / "logs"
    assert (logs / "superlink.log").is_file() and len(list(logs.glob("supernode-*.log"))) == 3
    # no private key (nor the CA's key) ever lands in the run directory, its logs included: the
    # deployment kept them in a private temp dir and removed it
    for path in out.rglob("*"):
        assert not re.fullmatch(r"ca\.key|server\.key|supernode-\d+", path.name), path
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    # a stopped server resumes in deployment too: a fresh deployment continues the run to round 3
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune", "deploy", "--config", str(ROOT / "simulations" / "deploy.toml"),
         "--out", str(out), "--resume", "--set", "federation.num_rounds=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    from fedtune.round.checkpoint import read_checkpoint_meta

    assert read_checkpoint_meta(out / "checkpoint")["round"] == 3
