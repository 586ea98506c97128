"""A client's local work for one train message: the config from the message, the cached base
model and tokenised partition, LoRA training (with pruning), and the reply's content.

:func:`handle_train` is called by the ClientApp (:mod:`clients.app`) in its own process, or
by a node's persistent worker (:mod:`clients.worker`) that keeps torch, the model and the
data loaded between rounds. The base model, the corpus and the client's tokenised partition
are loaded once per process and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.core.config import ExperimentConfig, ModelConfig, config_from_dict
from fedtune.data.batching import Tokenized, tokenize
from fedtune.data.partition import cached_federated_data
from fedtune.lora.factors import Factors
from fedtune.lora.records import factors_to_record, record_to_state
from fedtune.models.loading import cached_base_model
from fedtune.pruning.masks import masks_from_tensors, masks_to_tensors
from fedtune.pruning.prune_and_tune import PruneSpec
from fedtune.pruning.structure import Masks
from fedtune.training.local import train_local

__all__ = ["handle_train", "inject_fault"]

LOG = logging.getLogger("fedtune.client")


@functools.lru_cache(maxsize=8)
def _experiment(text: str) -> ExperimentConfig:
    import tomllib

    return config_from_dict(tomllib.loads(text))


def _model_config(cfg: ExperimentConfig, quantization: str) -> ModelConfig:
    """The experiment's model with this client's base-weight width (the server's choice)."""
    return dataclasses.replace(cfg.model, quantization=quantization, quantization_by_device={})


@functools.lru_cache(maxsize=64)
def _client_data(experiment_toml: str, client_id: int, quantization: str) -> Tokenized:
    cfg = _experiment(experiment_toml)
    base = cached_base_model(_model_config(cfg, quantization), cfg.seed)  # for its tokenizer
    fed = cached_federated_data(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
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


def load_prune_state(state: RecordDict) -> tuple[Masks | None, dict[int, dict[str, torch.Tensor]] | None]:
    """This client's masks and importance EMA from earlier rounds (its Flower node state)."""
    if PRUNE_STATE not in state.array_records:
        return None, None
    tensors = state.array_records[PRUNE_STATE].to_torch_state_dict()
    masks = masks_from_tensors({k: v for k, v in tensors.items() if k.startswith("mask::")})
    scores: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("score::"):
            _, layer, kind = key.split("::")
            scores.setdefault(int(layer), {})[kind] = t
    return masks, scores or None


def save_prune_state(state: RecordDict, masks: Masks, scores: dict[int, dict[str, torch.Tensor]] | None) -> None:
    tensors = masks_to_tensors(masks)
    for layer, m in (scores or {}).items():
        for kind, t in m.items():
            tensors[f"score::{layer}::{kind}"] = t.float()
    state[PRUNE_STATE] = ArrayRecord(tensors)


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


def handle_train(content: RecordDict, node_config: dict[str, Any], state: RecordDict, client_id: int,
                 on_crash: Callable[[], None] | None = None) -> RecordDict:
    """Train on one message's content; returns the reply content (raises on any failure).

    ``state`` is the node's persistent state (pruning masks and importance live there).
    """
    t0 = time.perf_counter()
    config = content["config"]
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
        (on_crash or (lambda: os._exit(3)))()
    quantization = str(config.get("quantization", cfg.model.quantization))
    model_cfg = _model_config(cfg, quantization)
    fraction = float(config.get("gpu-fraction", 0.0))
    if fraction and torch.cuda.is_available():  # this device class's share of the GPU
        torch.cuda.set_per_process_memory_fraction(fraction)
    t_setup = time.perf_counter()
    base = cached_base_model(model_cfg, cfg.seed)
    data = _client_data(experiment_toml, client_id, quantization)
    setup_s = time.perf_counter() - t_setup
    train_state = record_to_state(content["arrays"])
    seed = cfg.seed * 1_000_003 + server_round * 10_007 + client_id
    ratio = float(config.get("prune-ratio", 0.0))
    masks, scores = load_prune_state(state)
    prune = None
    if ratio > 0:
        prune = PruneSpec(target=ratio, interval=cfg.prune.interval, method=cfg.prune.importance, ema=cfg.prune.ema,
                          skip_layers=tuple(cfg.prune.skip_layers), recovery_steps=cfg.prune.recovery_steps)
    result = train_local(base, train_state, rank, data, cfg, train_a=bool(config.get("train-a", True)), seed=seed,
                         prune=prune, masks=masks, scores=scores)
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "train-loss": result.train_loss,
        "train-time-s": result.train_time_s,
        "setup-s": setup_s,
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
    reply = RecordDict({"arrays": factors_to_record(factors, result.head), "metrics": metrics,
                        "info": ConfigRecord({"worker": _worker_name(), "quantization": quantization})})
    if result.masks is not None:
        save_prune_state(state, result.masks, result.scores)
        reply["masks"] = ArrayRecord(masks_to_tensors(result.masks))
        metrics["prune-ratio"] = result.sparsity
    return reply
