"""The fedtune ClientApp: message in -> local LoRA training (train) or scoring of the global
adapter on the client's held-out split (evaluate) on the cached base model -> reply out.

Every train message carries what the client needs for its round (:class:`fedtune.core.protocol.TrainRequest`),
so the same ClientApp serves Ray simulations and real SuperNodes without local configuration.
On a SuperNode, a node's client id is its ``partition-id`` node config (``--node-config
"partition-id=3 num-partitions=20"``) and its device class, reported to the server when it
is asked, its ``device`` node config. On Flower's simulation engine the server assigns the
client in each train message (``federation.client_ids``), so virtual nodes that are never
sampled never run.

Where the work runs: in a Ray simulation the ClientApp lives in a long-lived actor and
trains in-process (:func:`clients.local.handle_train`). On a SuperNode, Flower starts a
fresh ClientApp process for every message; with ``client-worker=true`` in the node config
(what ``fedtune deploy`` and ``docker-compose.yml`` set) this module stays light (no torch
import) and hands the message to the node's persistent worker (:mod:`clients.worker`), which
keeps torch, the base model and the tokenised partition loaded across rounds. If the worker
cannot be reached, its socket directory is not private to this user, or it refuses the request
as unreadable (:class:`clients.worker.WorkerUnavailable` and its subclasses), the ClientApp logs
why and does the work in-process. Evaluate messages take the same path
(:func:`clients.local.handle_evaluate`). Any failure is returned as an error reply naming the client and its
cause, so the round goes on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.core.protocol import CONFIG, METRICS, NodeIdentity

__all__ = ["app", "client_id_of"]

LOG = logging.getLogger("fedtune.client")
CLIENT_APP_RAISED_EXCEPTION = 1  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_TRUE = ("1", "true", "yes", "on")

app = ClientApp()
_LOADED_AT = time.time()  # this module imported: a fresh ClientApp process's start-up is behind it


def client_id_of(context: Context) -> int:
    return int(context.node_config.get("partition-id", context.node_id))


def assigned_client_id(msg: Message, context: Context) -> int:
    """On Flower's simulation engine every virtual node can serve any partition: the client the
    server names in the request (train or evaluate) (``federation.client_ids = "assign"``), else the node's own."""
    try:
        return int(msg.content[CONFIG]["client_id"])
    except (KeyError, TypeError, ValueError):
        return client_id_of(context)


def uses_worker(context: Context) -> bool:
    value = context.node_config.get("client-worker", os.environ.get("FEDTUNE_CLIENT_WORKER", ""))
    return str(value).lower() in _TRUE


def _process_started_at() -> float:
    """When this process started (epoch seconds): from /proc on Linux, as psutil computes it
    (importing psutil would cost a fresh process tens of milliseconds); psutil elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a measurement only
        return float("nan")


def _report_timing(msg: Message, metrics: MetricRecord, client_id: int, op: str, started: float, entered: float,
                   handoff: dict[str, float]) -> None:
    """Where a fresh ClientApp process's time went (deployment): process ages when this module was
    loaded (``app_loaded_s``: interpreter, Flower, the task pulled, the app bundle installed) and when
    the handler was entered (``handler_s``), its CPU seconds so far (``process_cpu_s``, what it cost
    whatever else the machine runs), and the worker hand-off's own cost (``handoff_s``: its wall
    time minus the worker's handler), in the reply's metrics and as one line on stdout (the
    SuperNode's log), with the hand-off's parts. ``started``: when this process started."""
    fields = {"app_loaded_s": _LOADED_AT - started, "handler_s": entered - started,
              "process_cpu_s": time.process_time()}
    if "worker_handle_s" in handoff and "total_s" in handoff:
        fields["handoff_s"] = handoff["total_s"] - handoff["worker_handle_s"]
    if op == "train":  # TrainMetrics fields (fedtune.core.protocol)
        for key, value in fields.items():
            metrics[key] = value
    cfg = msg.content.config_records.get(CONFIG)
    line = {"client_id": client_id, "op": op, "round": cfg.get("server_round") if cfg else None,
            "process_s": metrics["process_s"], **fields, **handoff}
    print("[fedtune] client timing " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                   for k, v in line.items()}), flush=True)


def _error_reply(msg: Message, client_id: int, exc: BaseException) -> Message:
    LOG.error("client %d failed:\n%s", client_id, traceback.format_exc())
    what = "" if type(exc).__name__ == "WorkerError" else f"{type(exc).__name__}: "  # the worker names it already
    reason = f"client {client_id}: {what}{exc}"
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    info = NodeIdentity(client_id=client_id_of(context), device=str(context.node_config.get("device", "")))
    return Message(RecordDict({CONFIG: ConfigRecord(info.to_config())}), reply_to=msg)


def _handle(msg: Message, context: Context, op: str) -> Message:
    """Run one ``train`` or ``evaluate`` message on the node's worker, else in this process."""
    entered = time.time()
    in_ray = "ray" in sys.modules  # a simulation actor (before the work imports anything)
    client_id = assigned_client_id(msg, context) if in_ray else client_id_of(context)
    handoff: dict[str, float] = {}
    try:
        content = None
        if uses_worker(context):
            from clients.worker import WorkerUnavailable, request_train

            try:
                content = request_train(msg.content, dict(context.node_config), context.state, client_id,
                                        context.node_id, op=op, timing=handoff)
            except WorkerUnavailable as exc:
                LOG.warning("client %d: %s: %s; running %s in this process", client_id, type(exc).__name__, exc, op)
        if content is None:
            from clients.local import handle_evaluate, handle_train

            handler = handle_evaluate if op == "evaluate" else handle_train
            content = handler(msg.content, dict(context.node_config), context.state, client_id)
        metrics: MetricRecord = content[METRICS]
        if in_ray:  # a long-lived simulation actor: no process start-up to measure
            metrics["process_s"] = float("nan")
        else:  # this ClientApp process's age when the reply is ready, and where its time went
            started = _process_started_at()
            metrics["process_s"] = time.time() - started
            _report_timing(msg, metrics, client_id, op, started, entered, handoff)
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - a crashed client must not crash the round
        return _error_reply(msg, client_id, exc)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter in the message on this client's held-out split (its masks applied)."""
    return _handle(msg, context, "evaluate")
