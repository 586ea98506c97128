"""The fedtune ClientApp: message in -> local LoRA training on the cached base model -> reply out.

The server ships the resolved experiment config (TOML) in every train message, so the
same ClientApp serves Ray simulations and real SuperNodes without local configuration.
A node's client id is its ``partition-id`` node config (set by Flower's simulation engine,
or ``--node-config "partition-id=3 num-partitions=20"`` on a SuperNode). The base model,
the corpus and the client's tokenised partition are loaded once per process and reused.
Any failure is returned as an error reply naming its cause, so the round goes on.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.adapters import Factors
from fedtune.config import ExperimentConfig, config_from_dict
from fedtune.data import cached_federated_data
from fedtune.models import cached_base_model
from fedtune.prune_tune import PruneSpec
from fedtune.pruning import Masks, masks_from_tensors, masks_to_tensors
from fedtune.records import factors_to_record, record_to_state
from fedtune.training import Tokenized, tokenize, train_local

__all__ = ["app", "client_id_of"]

LOG = logging.getLogger("fedtune.client")
CLIENT_APP_RAISED_EXCEPTION = 1  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION

app = ClientApp()


def client_id_of(context: Context) -> int:
    return int(context.node_config.get("partition-id", context.node_id))


@functools.lru_cache(maxsize=8)
def _experiment(text: str) -> ExperimentConfig:
    import tomllib

    return config_from_dict(tomllib.loads(text))


@functools.lru_cache(maxsize=64)
def _client_data(experiment_toml: str, client_id: int) -> Tokenized:
    cfg = _experiment(experiment_toml)
    fed = cached_federated_data(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
    base = cached_base_model(cfg.model, cfg.seed)
    return tokenize(fed.partition(client_id), base.tokenizer, cfg.model.task, cfg.model.max_length)


def _worker_name() -> str:
    """The Ray node this client ran on (simulation), else the host name (deployment)."""
    try:
        import ray

        if ray.is_initialized():
            return f"ray:{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # noqa: BLE001 - informational only
        pass
    import socket

    return f"host:{socket.gethostname()}"


PRUNE_STATE = "fedtune.prune"


def load_prune_state(context: Context) -> tuple[Masks | None, dict[int, dict[str, torch.Tensor]] | None]:
    """This client's masks and importance EMA from earlier rounds (its Flower node state)."""
    if PRUNE_STATE not in context.state.array_records:
        return None, None
    tensors = context.state.array_records[PRUNE_STATE].to_torch_state_dict()
    masks = masks_from_tensors({k: v for k, v in tensors.items() if k.startswith("mask::")})
    scores: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("score::"):
            _, layer, kind = key.split("::")
            scores.setdefault(int(layer), {})[kind] = t
    return masks, scores or None


def save_prune_state(context: Context, masks: Masks, scores: dict[int, dict[str, torch.Tensor]] | None) -> None:
    tensors = masks_to_tensors(masks)
    for layer, m in (scores or {}).items():
        for kind, t in m.items():
            tensors[f"score::{layer}::{kind}"] = t.float()
    context.state[PRUNE_STATE] = ArrayRecord(tensors)


def inject_fault(kind: str, factors: Factors) -> Factors:
    """A corrupted copy of an update, for fault-injection tests (``[faults]`` in the config)."""
    out = {m: (a.clone(), b.clone()) for m, (a, b) in factors.items()}
    first = sorted(out)[0]
    a, b = out[first]
    if kind == "nan":
        b[0, 0] = float("nan")
    elif kind == "shape":
        out[first] = (torch.cat([a, a[:, :1]], dim=1), b)
    elif kind == "rank":
        out = {m: (x[:-1].contiguous(), y[:, :-1].contiguous()) for m, (x, y) in out.items()}
    elif kind == "missing":
        del out[first]
    return out


def _error_reply(msg: Message, client_id: int, exc: BaseException) -> Message:
    LOG.error("client %d failed:\n%s", client_id, traceback.format_exc())
    reason = f"client {client_id}: {type(exc).__name__}: {exc}"
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    info = {"client-id": client_id_of(context), "device": str(context.node_config.get("device", ""))}
    return Message(RecordDict({"config": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client_id = client_id_of(context)
    try:
        t0 = time.perf_counter()
        config = msg.content["config"]
        experiment_toml = str(config["experiment"])
        cfg = _experiment(experiment_toml)
        torch.set_num_threads(cfg.train.num_threads)
        if "client-id" in config and int(config["client-id"]) != client_id:
            raise ValueError(f"message addressed to client {config['client-id']}, this node is {client_id}")
        server_round, rank = int(config["server-round"]), int(config["rank"])
        fault = cfg.faults.fault_for(client_id, server_round)
        if fault == "raise":
            raise RuntimeError(f"injected fault in round {server_round}")
        if fault == "crash":
            LOG.error("client %d: injected crash in round %d", client_id, server_round)
            os._exit(3)
        base = cached_base_model(cfg.model, cfg.seed)
        data = _client_data(experiment_toml, client_id)
        state = record_to_state(msg.content["arrays"])
        seed = cfg.seed * 1_000_003 + server_round * 10_007 + client_id
        ratio = float(config.get("prune-ratio", 0.0))
        masks, scores = load_prune_state(context)
        prune = None
        if ratio > 0:
            prune = PruneSpec(target=ratio, interval=cfg.prune.interval, method=cfg.prune.importance, ema=cfg.prune.ema,
                              skip_layers=tuple(cfg.prune.skip_layers))
        result = train_local(base, state, rank, data, cfg, train_a=bool(config.get("train-a", True)), seed=seed,
                             prune=prune, masks=masks, scores=scores)
        metrics = MetricRecord({
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "train-time-s": result.train_time_s,
            "handle-time-s": time.perf_counter() - t0,
            "steps": result.steps,
            "tokens": result.tokens,
            "loss-start": result.loss_start,
            "loss-end": result.loss_end,
            "rank": rank,
            "client-id": client_id,
        })
        factors = inject_fault(fault, result.factors) if fault else result.factors
        if fault == "hang":
            time.sleep(cfg.faults.hang_s)
        content = RecordDict({"arrays": factors_to_record(factors, result.head), "metrics": metrics,
                              "info": ConfigRecord({"worker": _worker_name()})})
        if result.masks is not None:
            save_prune_state(context, result.masks, result.scores)
            content["masks"] = ArrayRecord(masks_to_tensors(result.masks))
            metrics["prune-ratio"] = result.sparsity
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - a crashed client must not crash the round
        return _error_reply(msg, client_id, exc)
