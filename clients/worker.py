"""A SuperNode's persistent training worker: torch, the base model and the data stay loaded.

On a SuperNode, Flower starts a fresh ClientApp process for every message; importing torch,
transformers and peft and rebuilding the model and data in it costs seconds per round. With
``client-worker=true`` in the node config, the (light) ClientApp process forwards the message
to this worker over a Unix socket and returns its reply; the worker, started on first use
by the ClientApp and kept alive until it is idle for ``--idle-timeout`` seconds, runs
:func:`clients.local.handle_train` with everything already in memory.

Protocol (no pickle: nothing on the socket can run code): a sequence of frames, each an 8-byte
unsigned big-endian length followed by that many bytes of payload. A request opens with a JSON
header frame. ``{"op": "ping"}`` is answered by the header ``{"ok": true, "pid": ...}`` alone.
``{"op": "train", "client_id": ..., "node_config": {...}}`` (or ``"op": "evaluate"``, served by
:func:`clients.local.handle_evaluate`) is followed by two frames, the
message content and the node state as serialised Flower ``RecordDict`` protobufs; its reply is
the header ``{"ok": true, "timing": {...}}`` followed by the reply content and the updated node
state, where ``timing`` holds the worker's seconds spent reading and decoding the request
(``read_s``), running it (``handle_s``) and encoding the reply (``encode_s``). A failure
is answered by a header alone: ``{"ok": false, "error": ...}`` when training raised,
``{"ok": false, "crash": true}`` for an injected crash, and ``{"ok": false, "bad_request": true,
"error": ...}`` when the request itself could not be read (a length over the limit, a payload
that does not decode, a header of the wrong shape, a request cut short); the worker then closes
the connection without reading further, and :func:`request_train` raises :class:`WorkerRejected`.

Limits: a frame longer than ``--max-frame-bytes`` (``$FEDTUNE_WORKER_MAX_FRAME``, default
1 GiB) is refused from its length prefix, before any of its body is read. A connection must
deliver its whole request within ``--conn-timeout`` seconds of being accepted
(``$FEDTUNE_WORKER_CONN_TIMEOUT``, default 60), and take each reply frame within as long, or it
is dropped. The worker serves one connection at a time, and no connection can stop it.

The socket lives in a directory private to this user: ``$FEDTUNE_WORKER_DIR`` or
``<tmp>/fedtune-workers-<uid>``, created with mode 0700. An existing one that another user owns
(or a symlink to it, or a symlink another user owns), or that group or others can write, is
refused with :class:`UnsafeWorkerDir`; one of this user's that others can only read is
tightened to 0700. One socket per node and app version.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

__all__ = ["UnsafeWorkerDir", "WorkerError", "WorkerRejected", "WorkerUnavailable", "ping", "request_train",
           "serve", "worker_dir"]

APP_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAX_FRAME = 1 << 30  # bytes: far above a LoRA payload, far below what would exhaust memory
DEFAULT_CONN_TIMEOUT = 60.0  # seconds for a whole request to arrive, and for each reply frame to leave
MAX_FRAME_ENV = "FEDTUNE_WORKER_MAX_FRAME"
CONN_TIMEOUT_ENV = "FEDTUNE_WORKER_CONN_TIMEOUT"
_LENGTH = struct.Struct(">Q")

Handler = Callable[..., RecordDict]  # handle_train(content, node_config, state, client_id, on_crash=...)
OPS = ("train", "evaluate")  # the ops that carry a message


class WorkerUnavailable(RuntimeError):
    """The node's worker could not be reached or started, or did not serve the request."""


class WorkerRejected(WorkerUnavailable):
    """The worker refused the request as unreadable (too large or malformed); it trained nothing."""


class UnsafeWorkerDir(WorkerUnavailable):
    """The worker directory is not private to this user: another user owns it, or group or others can write it."""


class WorkerError(RuntimeError):
    """The worker's training raised; the message names the exception and its cause."""


class _BadFrame(ValueError):
    """A request or reply that cannot be read: a length over the limit, or a payload of the wrong shape."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number, not {raw!r}") from None
    if not value > 0:
        raise ValueError(f"${name} must be positive, not {raw!r}")
    return value


def max_frame_bytes() -> int:
    """The longest frame either side accepts: ``$FEDTUNE_WORKER_MAX_FRAME`` bytes, or 1 GiB."""
    return int(_env_number(MAX_FRAME_ENV, DEFAULT_MAX_FRAME))


def conn_timeout_s() -> float:
    """Seconds the worker gives a connection: ``$FEDTUNE_WORKER_CONN_TIMEOUT``, or 60."""
    return _env_number(CONN_TIMEOUT_ENV, DEFAULT_CONN_TIMEOUT)


# ----------------------------------------------------------------------------- socket directory


def _private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check that the existing one is private to this user.

    Refused (:class:`UnsafeWorkerDir`): a directory another user owns, a symlink another user
    owns or one pointing to such a directory, one that group or others can write, or anything
    that is not a directory. One of this user's that others can only read is tightened to 0700.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UnsafeWorkerDir(f"worker directory {path} cannot be created: {exc}") from exc
    uid = os.getuid()
    try:
        link, st = path.lstat(), path.stat()
    except OSError as exc:
        raise UnsafeWorkerDir(f"worker directory {path} cannot be checked: {exc}") from exc
    hint = "remove it or set $FEDTUNE_WORKER_DIR to a directory of your own"
    if stat.S_ISLNK(link.st_mode) and link.st_uid != uid:
        raise UnsafeWorkerDir(f"worker directory {path} is a symlink owned by uid {link.st_uid}, not by this user "
                              f"(uid {uid}); {hint}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeWorkerDir(f"worker directory {path} is not a directory; {hint}")
    if st.st_uid != uid:
        raise UnsafeWorkerDir(f"worker directory {path} is owned by uid {st.st_uid}, not by this user (uid {uid}); "
                              f"{hint}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafeWorkerDir(f"worker directory {path} is writable by group or others (mode {mode:04o}); "
                              f"make it private (chmod 700) or {hint}")
    if mode != 0o700:
        os.chmod(path, 0o700)
    return path


def worker_dir() -> Path:
    """This user's worker directory (checked, see :func:`_private_dir`)."""
    return _private_dir(Path(os.environ.get("FEDTUNE_WORKER_DIR")
                             or Path(tempfile.gettempdir()) / f"fedtune-workers-{os.getuid()}"))


def socket_path(node_id: int) -> Path:
    """One worker per node and app version (Flower installs each app version in its own directory).
    Its pid file, log and lock sit beside it; a Unix socket path must stay under 108 bytes, so a
    socket whose path would be longer lives in a short private directory under the temp dir."""
    version = hashlib.sha1(str(APP_ROOT).encode()).hexdigest()[:8]
    return worker_dir() / f"node-{node_id}-{version}.sock"


def _bind_path(path: Path) -> Path:
    if len(str(path)) < 100:
        return path
    short = _private_dir(Path(tempfile.gettempdir()) / f"fedtune-w-{os.getuid()}")
    return short / (hashlib.sha1(str(path).encode()).hexdigest()[:20] + ".sock")


# ----------------------------------------------------------------------------- framing


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        if len(frame) < 1 << 16:
            sock.sendall(_LENGTH.pack(len(frame)) + frame)
        else:  # no copy of a large payload
            sock.sendall(_LENGTH.pack(len(frame)))
            sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    """``n`` bytes; by ``deadline`` (a ``time.monotonic()`` value) if given, else as the socket's timeout allows."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {n} bytes arrived in time")
            sock.settimeout(left)
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError(f"connection closed after {got} of {n} bytes of a frame")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, max_bytes: int, deadline: float | None = None) -> bytes:
    """One frame; a length prefix over ``max_bytes`` is refused before any of the body is read."""
    (n,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline))
    if n > max_bytes:
        raise _BadFrame(f"frame length {n} exceeds the limit of {max_bytes} bytes "
                        f"(--max-frame-bytes or ${MAX_FRAME_ENV})")
    return _recv_exact(sock, n, deadline)


def _encode(rd: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(rd).SerializeToString()


def _decode(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _header(data: bytes) -> dict[str, Any]:
    try:
        header = json.loads(data)
    except ValueError as exc:
        raise _BadFrame(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _BadFrame(f"header is a JSON {type(header).__name__}, not an object")
    return header


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


def _exchange(sock: socket.socket, frames: tuple[bytes, ...], max_bytes: int) -> dict[str, Any]:
    """Send a request and read the reply's header. A worker that refuses a request answers before
    reading all of it and closes the connection, so the send may fail with the answer waiting."""
    send_error: OSError | None = None
    try:
        _send(sock, *frames)
    except OSError as exc:
        send_error = exc
    try:
        reply = _header(_recv(sock, max_bytes))
    except (OSError, _BadFrame) as exc:
        cause = send_error or exc
        raise WorkerUnavailable(f"worker connection failed: {cause}") from cause
    if reply.get("bad_request"):
        raise WorkerRejected(f"worker refused the request: {reply.get('error')}")
    return reply


def request_train(content: RecordDict, node_config: dict[str, Any], state: RecordDict, client_id: int, node_id: int,
                  *, idle_timeout: float = 900.0, wait_s: float = 180.0, op: str = "train",
                  timing: dict[str, float] | None = None) -> RecordDict:
    """Have the node's worker train on ``content`` (``op="evaluate"``: evaluate it); ``state`` is updated
    in place; returns the reply content.

    Raises :class:`WorkerError` when training raised in the worker, :class:`WorkerRejected` when
    the worker refused the request as unreadable, and :class:`WorkerUnavailable` (the base of
    both the latter) when no worker could be reached or the connection failed.

    ``timing``, when given, receives the hand-off's seconds: ``encode_s`` (serialising the
    request here), ``connect_s`` (reaching, or starting, the worker), ``exchange_s`` (from the
    first byte sent to the reply's header), the worker's own ``worker_read_s``, ``worker_handle_s``
    and ``worker_encode_s``, ``receive_s`` (reading and decoding the reply here) and ``total_s``.
    """
    timing = {} if timing is None else timing
    t0 = time.perf_counter()
    path = socket_path(node_id)
    max_bytes = max_frame_bytes()
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, not {op!r}")
    header = {"op": op, "client_id": client_id, "node_config": node_config}
    frames = (json.dumps(header).encode(), _encode(content), _encode(state))  # before connecting: the worker waits
    t1 = time.perf_counter()
    sock = _connect(path) or _start_worker(path, idle_timeout, wait_s)
    t2 = time.perf_counter()
    timing.update(encode_s=t1 - t0, connect_s=t2 - t1)
    with sock:
        reply = _exchange(sock, frames, max_bytes)
        timing["exchange_s"] = time.perf_counter() - t2
        _worker_timing(reply, timing)
        if reply.get("crash"):
            os._exit(3)  # an injected crash: this ClientApp process dies, as it would in-process
        if not reply.get("ok"):
            raise WorkerError(reply.get("error") or f"worker replied {reply}")
        try:
            out_data, state_data = _recv(sock, max_bytes), _recv(sock, max_bytes)
        except (OSError, _BadFrame) as exc:
            raise WorkerUnavailable(f"worker connection failed: {exc}") from exc
    try:
        out, new_state = _decode(out_data), _decode(state_data)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise WorkerUnavailable(f"worker sent an unreadable reply: {type(exc).__name__}: {exc}") from exc
    for key in list(state.keys()):
        if key not in new_state:
            del state[key]
    for key, value in new_state.items():
        state[key] = value
    t3 = time.perf_counter()
    timing.update(receive_s=t3 - t2 - timing["exchange_s"], total_s=t3 - t0)
    return out


def _worker_timing(reply: dict[str, Any], timing: dict[str, float]) -> None:
    """Copy the worker's own seconds (``read_s``, ``handle_s``, ``encode_s``) from its reply header."""
    sent = reply.get("timing")
    for key in ("read_s", "handle_s", "encode_s"):
        value = sent.get(key) if isinstance(sent, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            timing[f"worker_{key}"] = float(value)


def ping(node_id: int, timeout: float = 5.0) -> dict[str, Any]:
    """The reply of the node's running worker to a ping (``ok``, ``pid``); starts none.
    Raises :class:`WorkerUnavailable` when no worker answers within ``timeout`` seconds."""
    path = socket_path(node_id)
    sock = _connect(path)
    if sock is None:
        raise WorkerUnavailable(f"no worker listens on {_bind_path(path)}")
    with sock:
        sock.settimeout(timeout)
        return _exchange(sock, (json.dumps({"op": "ping"}).encode(),), max_frame_bytes())


# ----------------------------------------------------------------------------- worker side


class _Crash(Exception):
    pass


def _raise_crash() -> None:
    raise _Crash()


LOG = logging.getLogger("fedtune.worker")


def _log(text: str) -> None:
    LOG.info("worker %d: %s", os.getpid(), text)


def _read_request(conn: socket.socket, max_bytes: int, deadline: float
                  ) -> tuple[dict[str, Any], RecordDict | None, RecordDict | None]:
    header = _header(_recv(conn, max_bytes, deadline))
    op = header.get("op")
    if op == "ping":
        return header, None, None
    if op not in OPS:
        raise _BadFrame(f"unknown op {op!r}")
    client_id = header.get("client_id")
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        raise _BadFrame(f"client_id must be an integer, not {client_id!r}")
    if not isinstance(header.get("node_config"), dict):
        raise _BadFrame("node_config must be a JSON object")
    decoded = []
    for what in ("content", "node state"):
        data = _recv(conn, max_bytes, deadline)
        try:
            decoded.append(_decode(data))
        except Exception as exc:  # protobuf raises its own DecodeError
            raise _BadFrame(f"the {what} is not a serialised RecordDict: {type(exc).__name__}: {exc}") from exc
    return header, decoded[0], decoded[1]


def _reply(conn: socket.socket, timeout: float, *frames: bytes) -> None:
    conn.settimeout(timeout)  # per frame: sendall's timeout bounds the whole call
    try:
        _send(conn, *frames)
    except OSError as exc:
        _log(f"reply not delivered ({type(exc).__name__}: {exc}); connection dropped")


def _serve_one(conn: socket.socket, handler: Handler, max_bytes: int, conn_timeout: float,
               evaluate: Handler | None = None) -> None:
    """Serve one connection; nothing it sends, or fails to send, escapes as an exception."""
    t0 = time.perf_counter()
    try:
        header, content, state = _read_request(conn, max_bytes, time.monotonic() + conn_timeout)
    except (_BadFrame, OSError) as exc:
        if isinstance(exc, TimeoutError):
            exc = TimeoutError(f"no complete request within {conn_timeout:g}s ({exc})")
        _log(f"bad request: {exc}")
        _reply(conn, 1.0, json.dumps({"ok": False, "bad_request": True, "error": str(exc)}).encode())  # if heard
        return
    if header["op"] == "ping":
        _reply(conn, conn_timeout, json.dumps({"ok": True, "pid": os.getpid()}).encode())
        return
    assert content is not None and state is not None
    try:
        if header["op"] == "evaluate" and evaluate is None:
            raise RuntimeError("this worker serves no evaluate requests")
        run = evaluate if header["op"] == "evaluate" else handler
        t1 = time.perf_counter()
        out = run(content, header["node_config"], state, header["client_id"], on_crash=_raise_crash)
        t2 = time.perf_counter()
        body = (_encode(out), _encode(state))
        timing = {"read_s": t1 - t0, "handle_s": t2 - t1, "encode_s": time.perf_counter() - t2}
        frames: tuple[bytes, ...] = (json.dumps({"ok": True, "timing": timing}).encode(), *body)
    except _Crash:
        frames = (json.dumps({"ok": False, "crash": True}).encode(),)
    except Exception as exc:  # noqa: BLE001 - reported to the ClientApp, which names the client
        frames = (json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode(),)
    _reply(conn, conn_timeout, *frames)


def serve(path: Path, idle_timeout: float, *, max_frame: int | None = None, conn_timeout: float | None = None,
          handler: Handler | None = None, evaluate: Handler | None = None) -> None:
    """Serve the socket ``path`` until idle for ``idle_timeout`` seconds.

    ``max_frame`` (bytes) and ``conn_timeout`` (seconds) default to :func:`max_frame_bytes` and
    :func:`conn_timeout_s`; ``handler`` runs a train request and ``evaluate`` an evaluate request
    (default :func:`clients.local.handle_train` and :func:`~clients.local.handle_evaluate`, imported
    here, once; a given ``handler`` alone serves no evaluate requests). The socket's directory must be
    private to this user (:class:`UnsafeWorkerDir` otherwise).
    """
    max_frame = max_frame_bytes() if max_frame is None else max_frame
    conn_timeout = conn_timeout_s() if conn_timeout is None else conn_timeout
    if max_frame <= 0 or conn_timeout <= 0:
        raise ValueError(f"max_frame and conn_timeout must be positive, not {max_frame} and {conn_timeout}")
    _private_dir(path.parent)
    bound = _bind_path(path)
    if handler is None:
        from clients import local  # the heavy imports happen once, here

        handler, evaluate = local.handle_train, evaluate or local.handle_evaluate

    pid_file = path.with_suffix(".pid")
    pid_file.write_text(str(os.getpid()))
    with contextlib.suppress(FileNotFoundError):
        bound.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(bound))
        os.chmod(bound, 0o600)
        server.listen(8)
        server.settimeout(idle_timeout)
        _log(f"serving {bound} (frames up to {max_frame} bytes, {conn_timeout:g}s per connection)")
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                _log(f"idle for {idle_timeout:g}s; exiting")
                return
            with conn:
                _serve_one(conn, handler, max_frame, conn_timeout, evaluate)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            bound.unlink()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


def main(argv: list[str] | None = None) -> None:
    import signal

    ap = argparse.ArgumentParser(description="fedtune's persistent per-node training worker")
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--idle-timeout", type=float, default=900.0, help="exit after this many idle seconds")
    ap.add_argument("--max-frame-bytes", type=int, default=None,
                    help=f"refuse a longer frame (default ${MAX_FRAME_ENV}, else {DEFAULT_MAX_FRAME})")
    ap.add_argument("--conn-timeout", type=float, default=None,
                    help=f"seconds a connection has to deliver its request (default ${CONN_TIMEOUT_ENV}, "
                         f"else {DEFAULT_CONN_TIMEOUT:g})")
    args = ap.parse_args(argv)
    console = logging.StreamHandler(sys.stdout)  # the worker's log file (see _start_worker)
    console.setFormatter(logging.Formatter("[fedtune] %(message)s"))
    LOG.addHandler(console)
    LOG.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped: remove the socket on the way out
    try:
        serve(args.socket, args.idle_timeout, max_frame=args.max_frame_bytes, conn_timeout=args.conn_timeout)
    except (UnsafeWorkerDir, ValueError) as exc:
        LOG.error("worker: %s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
