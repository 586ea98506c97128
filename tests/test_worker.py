"""A node's persistent worker (clients/worker.py) on a real Unix socket: what it does with requests
that are too large, too slow or malformed, and with a socket directory that is not private.

Most tests run the worker's server loop in a thread, with a stand-in for training (no torch);
the last ones start ``python -m clients.worker`` as the ClientApp does.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from clients.worker import (
    UnsafeWorkerDir,
    WorkerError,
    WorkerRejected,
    WorkerUnavailable,
    ping,
    request_train,
    serve,
    socket_path,
    worker_dir,
)

ROOT = Path(__file__).resolve().parents[1]
NODE = 7
LIMIT = 64 * 1024  # the worker's frame limit in these tests
TIMEOUT = 0.5  # the worker's per-connection timeout in these tests
BIG = 4 * 1024 * 1024  # more than a Unix socket buffers: a sender blocks until the other side reads


def fake_train(content, node_config, state, client_id, on_crash=None):
    """Stands in for clients.local.handle_train."""
    if "raise" in node_config:
        raise RuntimeError("injected")
    state["seen"] = ConfigRecord({"client": client_id})
    if "big" in node_config:
        return RecordDict({"blob": ConfigRecord({"data": b"x" * BIG})})
    return RecordDict({"metrics": MetricRecord({"records": len(content)})})


def wait_for_ping(node_id, proc=None, wait_s=10.0):
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ping(node_id)
        except WorkerUnavailable:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            time.sleep(0.05)


def serve_in_thread(path, idle_timeout):
    thread = threading.Thread(target=serve, args=(path, idle_timeout), daemon=True,
                              kwargs={"max_frame": LIMIT, "conn_timeout": TIMEOUT, "handler": fake_train})
    thread.start()
    return thread


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """A worker serving node NODE's socket in a thread; it exits by itself after 5 idle seconds."""
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / "workers"))
    path = socket_path(NODE)
    serve_in_thread(path, 5.0)
    wait_for_ping(NODE)
    return path


def connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(10)
    return sock


def frame(payload: bytes) -> bytes:
    return struct.pack(">Q", len(payload)) + payload


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def reply_of(sock) -> dict:
    (n,) = struct.unpack(">Q", recv_exact(sock, 8))
    return json.loads(recv_exact(sock, n))


def closed(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def train_header(**fields) -> bytes:
    return json.dumps({"op": "train", "client_id": 1, "node_config": {}, **fields}).encode()


EMPTY = b""  # a serialised empty RecordDict


# ----------------------------------------------------------------------------- the happy path


def test_ping_and_train_round_trip(worker):
    assert ping(NODE) == {"ok": True, "pid": os.getpid()}
    state = RecordDict({"old": ConfigRecord({"a": 1})})
    out = request_train(RecordDict({"x": ConfigRecord({"b": 2})}), {}, state, client_id=3, node_id=NODE)
    assert out["metrics"]["records"] == 1
    assert set(state.keys()) == {"old", "seen"} and state["seen"]["client"] == 3
    with pytest.raises(WorkerError, match="RuntimeError: injected"):
        request_train(RecordDict(), {"raise": True}, RecordDict(), client_id=3, node_id=NODE)


def test_an_idle_worker_exits_and_removes_its_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / "workers"))
    path = socket_path(NODE)
    thread = serve_in_thread(path, 0.5)
    assert wait_for_ping(NODE)["ok"]
    thread.join(timeout=10)
    assert not thread.is_alive() and not path.exists() and not path.with_suffix(".pid").exists()


# ----------------------------------------------------------------------------- frame size limit


def test_an_oversized_length_prefix_is_refused_before_its_body(worker):
    with connect(worker) as sock:
        t0 = time.monotonic()
        sock.sendall(struct.pack(">Q", 1 << 40))  # a terabyte announced, nothing sent
        reply = reply_of(sock)
        assert time.monotonic() - t0 < TIMEOUT  # answered from the prefix, not after a timeout
        assert reply["ok"] is False and reply["bad_request"] is True
        assert f"frame length {1 << 40} exceeds the limit of {LIMIT} bytes" in reply["error"]
        assert closed(sock)
    assert ping(NODE)["ok"]


def test_the_clientapp_side_raises_a_clear_error_for_a_refused_request(worker):
    """The worker answers before reading the request's body and hangs up; the sender's write
    fails, and it still reads and raises the worker's reason (a WorkerUnavailable: the
    ClientApp trains in-process instead)."""
    content = RecordDict({"x": ConfigRecord({"data": b"x" * BIG})})
    state = RecordDict({"kept": ConfigRecord({"a": 1})})
    with pytest.raises(WorkerRejected, match=f"worker refused the request: frame length .* exceeds the limit of {LIMIT}"):
        request_train(content, {}, state, client_id=1, node_id=NODE)
    assert list(state.keys()) == ["kept"]
    out = request_train(RecordDict(), {}, RecordDict(), client_id=1, node_id=NODE)  # and serves the next one
    assert out["metrics"]["records"] == 0


# ----------------------------------------------------------------------------- connection timeout


@pytest.mark.parametrize("sent", [b"", b"\x00\x00\x00", frame(b'{"op": "ping"}')[:12], frame(train_header()),
                                  frame(train_header()) + struct.pack(">Q", 100) + b"x" * 10],
                         ids=["nothing", "part-of-a-prefix", "part-of-a-header", "header-only", "half-a-body"])
def test_a_stalled_connection_is_dropped_and_the_worker_serves_on(worker, sent):
    with connect(worker) as stalled:
        stalled.sendall(sent)
        t0 = time.monotonic()
        assert ping(NODE, timeout=10)["ok"]  # queued behind the stalled connection until it is dropped
        assert TIMEOUT * 0.8 <= time.monotonic() - t0 < 5
        reply = reply_of(stalled)
        assert reply["bad_request"] is True and f"no complete request within {TIMEOUT:g}s" in reply["error"]
        assert closed(stalled)


def test_a_trickling_connection_is_dropped_at_its_deadline(worker):
    """The timeout bounds the whole request, not each read: a byte every 0.1 s does not keep it open."""
    with connect(worker) as sock:
        sock.sendall(struct.pack(">Q", 1000))
        t0 = time.monotonic()
        with pytest.raises(OSError):  # the worker hangs up: a write fails
            while time.monotonic() - t0 < 5:
                sock.sendall(b"x")
                time.sleep(0.1)
        assert time.monotonic() - t0 < TIMEOUT + 1.5
    assert ping(NODE)["ok"]


def test_a_client_that_does_not_read_its_reply_is_dropped(worker):
    with connect(worker) as sock:
        sock.sendall(frame(train_header(node_config={"big": 1})) + frame(EMPTY) + frame(EMPTY))
        time.sleep(0.1)  # training done; the worker is blocked writing a reply larger than the buffer
        t0 = time.monotonic()
        assert ping(NODE, timeout=10)["ok"]
        assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(("sent", "error"), [
    (frame(b"not json"), "header is not JSON"),
    (frame(b"\xff\xfe\x00"), "header is not JSON"),
    (frame(b""), "header is not JSON"),
    (frame(b"[1, 2]"), "header is a JSON list, not an object"),
    (frame(b'{"op": "nap"}'), "unknown op 'nap'"),
    (frame(train_header(client_id="one")), "client_id must be an integer, not 'one'"),
    (frame(train_header(client_id=True)), "client_id must be an integer, not True"),
    (frame(train_header(node_config=[1])), "node_config must be a JSON object"),
    (frame(train_header()) + frame(b"\xff\xff\xff") + frame(EMPTY),
     "the content is not a serialised RecordDict: DecodeError"),
    (frame(train_header()) + frame(EMPTY) + frame(b"\x0a\x05"), "the node state is not a serialised RecordDict"),
], ids=["text", "not-utf8", "empty", "list", "unknown-op", "str-client", "bool-client", "list-config",
        "bad-content", "bad-state"])
def test_a_malformed_request_is_answered_with_an_error(worker, sent, error):
    with connect(worker) as sock:
        sock.sendall(sent)
        reply = reply_of(sock)
        assert reply["ok"] is False and reply["bad_request"] is True and error in reply["error"]
        assert closed(sock)
    assert ping(NODE)["ok"]


# ----------------------------------------------------------------------------- the socket directory


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o1777])
def test_a_socket_directory_others_can_write_is_refused(tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(shared))
    expected = f"worker directory {shared} is writable by group or others"
    with pytest.raises(UnsafeWorkerDir, match=expected):
        worker_dir()
    with pytest.raises(UnsafeWorkerDir, match=expected):  # a WorkerUnavailable: the ClientApp trains in-process
        request_train(RecordDict(), {}, RecordDict(), client_id=1, node_id=NODE)
    with pytest.raises(UnsafeWorkerDir, match=expected):
        serve(shared / "node.sock", 1.0, handler=fake_train)
    assert list(shared.iterdir()) == []  # nothing bound, written or started there


def test_a_socket_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(mine))
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # as another user sees it
    with pytest.raises(UnsafeWorkerDir, match=f"worker directory {mine} is owned by uid {owner}, not by this user"):
        worker_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="changing a directory's owner needs root")
def test_a_socket_directory_chowned_away_is_refused(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    link = tmp_path / "link"
    link.symlink_to(theirs)
    for path in (theirs, link):
        monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(path))
        with pytest.raises(UnsafeWorkerDir, match=f"worker directory {path} is owned by uid 65534"):
            worker_dir()


def test_a_socket_directory_that_is_not_a_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name, reason in [("file", "cannot be created"), ("dangling", "cannot be created")]:
        monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / name))
        with pytest.raises(UnsafeWorkerDir, match=f"worker directory {tmp_path / name} {reason}"):
            worker_dir()


def test_a_private_socket_directory_is_created_or_tightened(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / "new" / "workers"))
    assert worker_dir().stat().st_mode & 0o777 == 0o700
    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o755)  # others may read but not write: ours, made private
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(readable))
    assert worker_dir() == readable and readable.stat().st_mode & 0o777 == 0o700


# ----------------------------------------------------------------------------- the worker process


def start_worker(path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "clients.worker", "--socket", str(path), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_worker_process_refuses_an_unsafe_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    proc = start_worker(shared / "node-1.sock")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"worker directory {shared} is writable by group or others" in out
    assert list(shared.iterdir()) == []


def test_the_worker_process_survives_bad_connections(tmp_path, monkeypatch):
    """``python -m clients.worker`` with its limits on the command line: a refused frame, a stalled
    connection and a malformed payload each get their answer, and the worker still serves."""
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / "workers"))
    path = socket_path(NODE)
    proc = start_worker(path, "--idle-timeout", "60", "--max-frame-bytes", "4096", "--conn-timeout", str(TIMEOUT))
    try:
        assert wait_for_ping(NODE, proc, wait_s=120)["pid"] == proc.pid
        with connect(path) as sock:
            sock.sendall(struct.pack(">Q", 4097))
            assert "exceeds the limit of 4096 bytes" in reply_of(sock)["error"]
        with connect(path) as stalled:
            stalled.sendall(b"\x00\x00")
            assert "no complete request within" in reply_of(stalled)["error"]
        with connect(path) as sock:
            sock.sendall(frame(train_header()) + frame(b"\xff\xff\xff") + frame(EMPTY))
            assert "the content is not a serialised RecordDict" in reply_of(sock)["error"]
        assert ping(NODE)["pid"] == proc.pid and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and not path.exists() and not path.with_suffix(".pid").exists()
    assert "frames up to 4096 bytes, 0.5s per connection" in out and out.count("bad request:") == 3
