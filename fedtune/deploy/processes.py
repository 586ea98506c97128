"""A local Flower deployment as processes: the docker-compose topology on loopback.

``fedtune deploy`` starts a SuperLink and N SuperNodes as processes on 127.0.0.1 (the
same topology as ``docker-compose.yml``), with TLS and SuperNode authentication on by
default: certificates are generated for this deployment (:func:`generate_certificates`, the CA's
key discarded once it has signed), each SuperNode gets its own P-384 key pair (:func:`generate_node_keys`) and is registered
with ``flwr supernode register`` before it starts, so only registered nodes are admitted.
Each SuperNode's ``--node-config`` carries its ``partition-id`` and ``device`` class.
Then ``flwr run`` submits the app and the run's status is read back from Flower
(``flwr ls --run-id``): ``finished:completed`` is success.

Secrets (private keys) never land in the deployment or run directory: they are written with
mode 0600 into a private temporary directory (mode 0700) that :meth:`LocalDeployment.stop`
removes, and never logged. ``stop`` ends only processes this deployment started: its own
children, and the nodes' training workers whose pid files it finds only after checking each
pid's command line is that worker's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from fedtune.core.config import config_to_toml
from fedtune.deploy.certificates import generate_certificates, generate_node_keys
from fedtune.round.outputs import format_progress, read_metrics

__all__ = ["LocalDeployment", "NodeSpec", "app_bundle", "app_files", "flwr_env", "is_worker_process"]


APP_DIR = Path(__file__).resolve().parents[2]
# How often a SuperNode's SuperExec asks it for a task to start a ClientApp process for (Flower's
# default is 1 s: half a second of waiting per message on average); ``$FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
# when set. Each poll is one request on the node's local runtime API.
SUPEREXEC_POLL_S = "0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: this venv's bin first (SuperLink/SuperNode spawn
    ``flower-superexec`` from PATH), no telemetry, no update checks, no runtime installs, and the
    SuperExec's task poll every :data:`SUPEREXEC_POLL_S` seconds unless the environment sets it."""
    bindir = os.path.dirname(sys.executable)
    poll = os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


@dataclass
class NodeSpec:
    partition_id: int
    num_partitions: int
    device: str = ""
    worker: bool = True  # train in the node's persistent worker (clients/worker.py), not per-message processes

    def node_config(self) -> str:
        cfg = f"partition-id={self.partition_id} num-partitions={self.num_partitions}"
        cfg += f' device="{self.device}"' if self.device else ""
        return cfg + (" client-worker=true" if self.worker else "")


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes as processes on loopback; a context manager that stops them all."""

    work_dir: Path
    nodes: list[NodeSpec]
    tls: bool = True
    auth: bool = True
    port: int = 0
    connection: str = "fedtune-local"
    env_extra: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    secrets_dir: Path | None = None  # where certificates and keys go; default: a private temp dir, removed by stop()

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        self.home = self.work_dir / "flwr-home"
        self.logs = self.work_dir / "logs"
        self.port = self.port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs: dict[str, Path] = {}
        self.keys: dict[str, tuple[Path, Path]] = {}
        self._own_secrets = self.secrets_dir is None

    @property
    def secrets(self) -> Path:
        """Certificates and private keys: outside the work (and run) directory, mode 0700."""
        if self.secrets_dir is None:
            self.secrets_dir = Path(tempfile.mkdtemp(prefix="fedtune-secrets-"))
        self.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.secrets_dir

    @property
    def env(self) -> dict[str, str]:
        return flwr_env(self.home, {"FEDTUNE_WORKER_DIR": str(self.work_dir / "workers"), **self.env_extra})

    def _bin(self, name: str) -> str:
        return os.path.join(os.path.dirname(sys.executable), name)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.connection}"', "", f"[superlink.{self.connection}]",
                 f'address = "{self.address}"']
        lines += [f'root-certificates = "{self.certs["ca"]}"'] if self.tls else ["insecure = true"]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self._bin("flwr"), *args], check=False, env=self.env, cwd=APP_DIR,
                              capture_output=True, text=True, timeout=timeout)

    def start_superlink(self) -> None:
        if self.tls and not self.certs:
            self.certs = generate_certificates(self.secrets / "certificates", keep_ca_key=False)
        self.write_connection()
        args = [self._bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.work_dir / "state.db"), "--disable-runtime-dependency-installation"]
        args += (["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                  "--ssl-keyfile", str(self.certs["key"])] if self.tls else ["--insecure"])
        if self.auth:
            args.append("--enable-supernode-auth")
        self._spawn("superlink", args)
        self.wait_for_port(self.port, "superlink")

    def wait_for_port(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{name} did not listen on port {port} within {timeout:.0f}s")

    def register(self, name: str) -> tuple[Path, Path]:
        """Create and register a SuperNode key pair; returns (private, public)."""
        private, public = generate_node_keys(self.secrets / "keys", [name])[name]
        proc = self.flwr("supernode", "register", str(public), self.connection, "--format", "json")
        if proc.returncode != 0:
            raise RuntimeError(f"registering SuperNode {name} failed: {(proc.stdout + proc.stderr)[-800:]}")
        self.keys[name] = (private, public)
        return private, public

    def start_supernode(self, name: str, spec: NodeSpec, *, register: bool = True) -> subprocess.Popen:
        """Start one SuperNode; with auth on, it is registered first unless ``register=False``."""
        args = [self._bin("flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1",
                "--port", str(free_port()), "--node-config", spec.node_config(), "--max-retries", "3",
                "--max-wait-time", "30"]
        if self.tls:  # TLS to the SuperLink, and on the SuperNode's own API its ClientApp processes use
            args += ["--root-certificates", str(self.certs["ca"]), "--ssl-ca-certfile", str(self.certs["ca"]),
                     "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
        else:
            args.append("--insecure")
        if self.auth:
            if register:
                private, _ = self.register(name)
            else:  # a node with keys the SuperLink never saw
                private, _ = generate_node_keys(self.secrets / "keys", [name])[name]
            args += ["--auth-supernode-private-key", str(private)]  # the public key is derived from it
        return self._spawn(name, args)

    def start(self) -> LocalDeployment:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.start_superlink()
        for i, spec in enumerate(self.nodes):
            self.start_supernode(f"supernode-{i}", spec)
        return self

    def start_run(self, run_config: dict[str, Any], app_dir: Path = APP_DIR) -> int:
        """``flwr run`` the app in ``app_dir`` (fedtune's by default) with ``run_config``; returns the
        run id (the run goes on in the SuperLink)."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        proc = self.flwr("run", str(app_dir), self.connection, "--run-config", rc, "--format", "json")
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run failed: {(proc.stdout + proc.stderr)[-1500:]}")
        return int(json.loads(proc.stdout)["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run as ``flwr ls --run-id`` reports it (``status``, ``status-details``, ...); {} when unknown."""
        proc = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        if proc.returncode != 0:
            raise RuntimeError(f"flwr ls failed: {(proc.stdout + proc.stderr)[-800:]}")
        runs = json.loads(proc.stdout)["runs"]
        return dict(runs[0]) if runs else {}

    def status(self, run_id: int) -> str:
        return str(self.run_info(run_id).get("status", "unknown"))

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for pid_file in (self.work_dir / "workers").glob("*.pid"):  # the nodes' training workers
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if is_worker_process(pid, pid_file):  # a stale file's pid may be anyone's process by now
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
        if self._own_secrets and self.secrets_dir is not None:
            shutil.rmtree(self.secrets_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:  # a start that failed or was interrupted leaves no process behind
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def app_bundle(app_dir: Path = APP_DIR) -> bytes:
    """The app bundle (FAB) that ``flwr run`` builds from ``app_dir``, by Flower's own rules
    (``[tool.flwr.app]`` ``fab-include`` / ``fab-exclude``, the root ``.gitignore``, Flower's built-in
    patterns), from :func:`app_files`."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app_dir))[0]


def app_files(app_dir: Path = APP_DIR) -> dict[str, bytes | Path]:
    """The files under ``app_dir`` that Flower's bundle rules start from (relative POSIX path ->
    path, symlinks skipped as ``flwr run`` does); directories that the root ``.gitignore`` or Flower
    itself excludes (``.venv``, ``.flwr``, ``__pycache__``) are not walked."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = Path(app_dir).resolve()
    ignored = build_pathspec([*load_gitignore_patterns(root / ".gitignore"), ".venv/", ".flwr/", "__pycache__/"])
    files: dict[str, bytes | Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not ignored.match_file(f"{(rel / d).as_posix()}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[(rel / name).as_posix()] = path
    return files


def is_worker_process(pid: int, pid_file: Path) -> bool:
    """Whether ``pid`` is the training worker that wrote ``pid_file``: a process of this user whose
    command line is ``python -m clients.worker --socket <the pid file's socket> ...``
    (clients/worker.py starts it so). False when it cannot be told (no /proc, gone, another user)."""
    if pid <= 1:
        return False
    proc = Path(f"/proc/{pid}")
    try:
        if proc.stat().st_uid != os.getuid():
            return False
        args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return False
    if "-m" not in args or args[args.index("-m") + 1:args.index("-m") + 2] != ["clients.worker"]:
        return False
    sock = args[args.index("--socket") + 1] if "--socket" in args[:-1] else None
    return sock is not None and Path(sock) == pid_file.with_suffix(".sock")


def node_specs(cfg: Any, nodes: int, worker: bool = True) -> list[NodeSpec]:
    """One SuperNode per client: partition i of ``nodes``, device class from the fleet mix if any."""
    devices = [name for name, count in cfg.fleet.devices.items() for _ in range(count)]
    return [NodeSpec(i, nodes, devices[i % len(devices)] if devices else "", worker) for i in range(nodes)]


def deploy(cfg: Any, out: Path, work_dir: Path, *, tls: bool = True, auth: bool = True, worker: bool = True,
           resume: bool = False, force: bool = False, timeout: float = 3600,
           say: Any = print) -> tuple[str, LocalDeployment]:
    """Start the topology, run ``cfg`` on it, stream its progress, stop everything; returns the run status."""
    n = cfg.federation.num_clients
    work_dir.mkdir(parents=True, exist_ok=True)
    experiment = (work_dir / "experiment.toml").resolve()  # the ServerApp runs from its installed app folder
    experiment.write_text(config_to_toml(cfg))
    dep = LocalDeployment(work_dir, node_specs(cfg, n, worker), tls=tls, auth=auth)
    say(f"[fedtune] deploying on {dep.address}: SuperLink + {n} SuperNodes"
        f" (TLS {'on' if tls else 'off'}, SuperNode auth {'on' if auth else 'off'},"
        f" {'persistent' if worker else 'per-message'} client workers); logs in {dep.logs}")
    with dep:
        run_id = dep.start_run({"experiment": str(experiment), "out-dir": str(out.resolve()), "resume": resume,
                                "force": force})
        say(f"[fedtune] run {run_id} submitted; outputs in {out}")
        metrics, status = out / "metrics.jsonl", "unknown"
        shown = len(read_metrics(metrics)) if resume and metrics.is_file() else 0
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = dep.status(run_id)
            if metrics.is_file():
                records = read_metrics(metrics)  # a line the server is still writing is left for the next poll
                for record in records[shown:]:
                    say(f"[fedtune] {format_progress(record, cfg.federation.num_rounds)}")
                shown = len(records)
            if status.startswith("finished"):
                break
            time.sleep(2.0)
        details = dep.run_info(run_id).get("status-details", "") if status.startswith("finished:failed") else ""
        say(f"[fedtune] run {run_id}: {status}" + (f": {details}" if details else ""))
    return status, dep
