"""Deployment: certificates and node keys, the compose files (validated statically: no Docker
engine here), and the same topology as real processes on 127.0.0.1 with TLS and SuperNode auth."""

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from fedtune.core.config import load_config
from fedtune.deploy.certificates import generate_certificates, generate_node_keys
from fedtune.deploy.compose import FLWR_VERSION, compose_files
from fedtune.deploy.processes import LocalDeployment, NodeSpec, node_specs
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


def _validate(*paths):
    return subprocess.run([f"{BIN}/check-jsonschema", "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_compose_files_are_valid_and_match_the_generator(tmp_path):
    files = [ROOT / "docker-compose.yml", ROOT / "with-tls.yml"]
    proc = _validate(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "bad.yml"  # the validator does reject a malformed file
    bad.write_text("services:\n  superlink:\n    image: x\n    ports: 9093\n    restart: sometimes\n")
    assert _validate(bad).returncode != 0
    base, tls = (yaml.safe_load(p.read_text()) for p in files)
    cfg = load_config(ROOT / "simulations" / "deploy.toml")
    assert (base, tls) == compose_files(node_specs(cfg, 3)), "regenerate: fedtune compose --config" \
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
    link = tls["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--insecure" not in link and "--ssl-certfile" in link
    for n in nodes:
        cmd = tls["services"][n]["command"]
        assert "--insecure" not in cmd and "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd
    # every secret file is one `fedtune certs certificates` writes
    written = {"ca.crt", "server.pem", "server.key"} | {f"keys/supernode-{i}" for i in range(3)}
    assert {s["file"].removeprefix("./certificates/") for s in tls["secrets"].values()} == written
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
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune", "deploy", "--config", str(ROOT / "simulations" / "deploy.toml"),
         "--out", str(out), "--set", 'faults.clients.2="crash"', "--set", "faults.rounds=[1]",
         "--set", "federation.round_timeout_s=45"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
    secrets = [p.read_text() for p in (out / "deployment" / "keys").glob("supernode-?")]
    secrets += [(out / "deployment" / "certificates" / "server.key").read_text()]
    for log in logs.glob("*.log"):  # no private key ever reaches a log
        text = log.read_text(errors="replace")
        assert not any(s.strip().splitlines()[1] in text for s in secrets)
    # a stopped server resumes in deployment too: a fresh deployment continues the run to round 3
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune", "deploy", "--config", str(ROOT / "simulations" / "deploy.toml"),
         "--out", str(out), "--resume", "--set", "federation.num_rounds=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["round"] == 3
