"""A SuperNode's persistent training worker: torch, the base model and the data stay loaded.

On a SuperNode, Flower starts a fresh ClientApp process for every message; importing torch,
transformers and peft and rebuilding the model and data in it costs seconds per round. With
``client-worker=true`` in the node config, the (light) ClientApp process forwards the message
to this worker over a Unix socket and returns its reply; the worker, started on first use
by the ClientApp and kept alive until it is idle for ``--idle-timeout`` seconds, runs
:func:`clients.local.handle_train` with everything already in memory.

Protocol (no pickle: nothing on the socket can run code): frames of a 4-byte big-endian
length and a payload. Request: a JSON header (``op``, ``client_id``, ``node_config``), the
message content and the node state as Flower ``RecordDict`` protobufs. Reply: a JSON header
(``ok``, ``error``, ``crash``) and the reply content and updated node state. The socket lives
in a directory only this user can open (mode 0700): ``$FEDTUNE_WORKER_DIR`` or
``<tmp>/fedtune-workers-<uid>``; one socket per node and app version.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

__all__ = ["WorkerError", "WorkerUnavailable", "request_train", "serve", "worker_dir"]

APP_ROOT = Path(__file__).resolve().parents[1]


class WorkerUnavailable(RuntimeError):
    """The node's worker could not be reached or started."""


class WorkerError(RuntimeError):
    """The worker's training raised; the message names the exception and its cause."""


def worker_dir() -> Path:
    path = Path(os.environ.get("FEDTUNE_WORKER_DIR") or Path(tempfile.gettempdir()) / f"fedtune-workers-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def socket_path(node_id: int) -> Path:
    """One worker per node and app version (Flower installs each app version in its own directory).
    Its pid file, log and lock sit beside it; a Unix socket path must stay under 108 bytes, so a
    socket whose path would be longer lives in a short private directory under the temp dir."""
    version = hashlib.sha1(str(APP_ROOT).encode()).hexdigest()[:8]
    return worker_dir() / f"node-{node_id}-{version}.sock"


def _bind_path(path: Path) -> Path:
    if len(str(path)) < 100:
        return path
    short = Path(tempfile.gettempdir()) / f"fedtune-w-{os.getuid()}"
    short.mkdir(exist_ok=True, mode=0o700)
    os.chmod(short, 0o700)
    return short / (hashlib.sha1(str(path).encode()).hexdigest()[:20] + ".sock")


# ----------------------------------------------------------------------------- framing


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(struct.pack(">Q", len(frame)) + frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("worker connection closed mid-message")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


def _encode(rd: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(rd).SerializeToString()


def _decode(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# ----------------------------------------------------------------------------- client side


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(_bind_path(path)))
        return sock
    except OSError:
        sock.close()
        return None


def _start_worker(path: Path, idle_timeout: float, wait_s: float) -> socket.socket:
    """Start the worker (once: under a lock) and wait for its socket."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        log = open(path.with_suffix(".log"), "a")  # noqa: SIM115 - handed to the worker
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP_ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "clients.worker", "--socket", str(path), "--idle-timeout",
                                 str(idle_timeout)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(APP_ROOT), start_new_session=True)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if proc.poll() is not None:
                raise WorkerUnavailable(f"worker exited with {proc.returncode}; see {path.with_suffix('.log')}")
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.1)
        raise WorkerUnavailable(f"worker did not open {_bind_path(path)} within {wait_s:.0f}s")


def request_train(content: RecordDict, node_config: dict[str, Any], state: RecordDict, client_id: int, node_id: int,
                  *, idle_timeout: float = 900.0, wait_s: float = 180.0) -> RecordDict:
    """Have the node's worker train on ``content``; ``state`` is updated in place; returns the reply content."""
    path = socket_path(node_id)
    sock = _connect(path) or _start_worker(path, idle_timeout, wait_s)
    with sock:
        header = {"op": "train", "client_id": client_id, "node_config": node_config}
        try:
            _send(sock, json.dumps(header).encode(), _encode(content), _encode(state))
            reply = json.loads(_recv(sock))
            if reply.get("crash"):
                os._exit(3)  # an injected crash: this ClientApp process dies, as it would in-process
            if not reply["ok"]:
                raise WorkerError(reply["error"])
            out, new_state = _decode(_recv(sock)), _decode(_recv(sock))
        except (ConnectionError, OSError, struct.error) as exc:
            raise WorkerUnavailable(f"worker connection failed: {exc}") from exc
    for key in list(state.keys()):
        if key not in new_state:
            del state[key]
    for key, value in new_state.items():
        state[key] = value
    return out


# ----------------------------------------------------------------------------- worker side


class _Crash(Exception):
    pass


def _raise_crash() -> None:
    raise _Crash()


def serve(path: Path, idle_timeout: float) -> None:
    import signal

    import clients.local as local  # the heavy imports happen once, here

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped: remove the socket on the way out

    pid_file = path.with_suffix(".pid")
    pid_file.write_text(str(os.getpid()))
    bound = _bind_path(path)
    with contextlib.suppress(FileNotFoundError):
        bound.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(bound))
    os.chmod(bound, 0o600)
    server.listen(8)
    server.settimeout(idle_timeout)
    print(f"[fedtune] worker {os.getpid()} serving {bound}", flush=True)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                print(f"[fedtune] worker idle for {idle_timeout:.0f}s; exiting", flush=True)
                return
            with conn:
                conn.settimeout(None)
                try:
                    header = json.loads(_recv(conn))
                    content, state = _decode(_recv(conn)), _decode(_recv(conn))
                except (ConnectionError, ValueError) as exc:
                    print(f"[fedtune] worker: bad request: {exc}", flush=True)
                    continue
                try:
                    out = local.handle_train(content, header["node_config"], state, int(header["client_id"]),
                                             on_crash=_raise_crash)
                    _send(conn, json.dumps({"ok": True}).encode(), _encode(out), _encode(state))
                except _Crash:
                    _send(conn, json.dumps({"ok": False, "crash": True}).encode())
                except Exception as exc:  # noqa: BLE001 - reported to the ClientApp, which names the client
                    _send(conn, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            bound.unlink()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description="fedtune's persistent per-node training worker")
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--idle-timeout", type=float, default=900.0)
    args = ap.parse_args()
    serve(args.socket, args.idle_timeout)


if __name__ == "__main__":
    main()
