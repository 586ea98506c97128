"""A client's local work for one message: the config from the message, the cached base model
and tokenised partition, LoRA training (with pruning), and the reply's content.

:func:`handle_train` serves a train message; :func:`handle_evaluate` an evaluate message: the
global adapter, at the client's rank and under its own pruning masks, scored on the client's
held-out split (``data.client_eval_fraction``), which its training split never contains. Both are called by the ClientApp (:mod:`clients.app`) in its own process, or
by a node's persistent worker (:mod:`clients.worker`) that keeps torch, the model and the
data loaded between rounds. The base model, the corpus and the client's tokenised partition
are loaded once per process and reused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.core.metric import metric_for_task
from fedtune.core.protocol import (
    ARRAYS,
    CONFIG,
    INFO,
    MASK_STEPS,
    MASKS,
    METRICS,
    NODE_STATE_PRUNE,
    ClientSetup,
    ReplyInfo,
    TrainMetrics,
    TrainRequest,
)
from fedtune.data.batching import Tokenized, tokenize
from fedtune.data.partition import cached_federated_data
from fedtune.lora.factors import Factors, GlobalAdapter
from fedtune.lora.records import factors_to_record, record_to_state, state_to_tensors
from fedtune.lora.transport import (
    encode_with_feedback,
    residual_from_record,
    residual_to_record,
)
from fedtune.models.loading import cached_base_model
from fedtune.pruning.masks import masks_from_tensors, masks_to_tensors
from fedtune.pruning.structure import Masks
from fedtune.training.local import evaluate_global, train_local

__all__ = ["RESIDUAL_STATE", "handle_evaluate", "handle_train", "inject_fault"]

RESIDUAL_STATE = "fedtune.transport.residual"  # node-state ArrayRecord: what the last lossy reply could not carry

LOG = logging.getLogger("fedtune.client")


_PARTITIONS: OrderedDict[tuple[str, int, str], Tokenized] = OrderedDict()
_MAX_PARTITIONS = 64  # a worker serving many virtual clients keeps the most recently used ones


def client_partition(setup: ClientSetup, client_id: int, split: str = "train") -> Tokenized:
    """The client's tokenised training split (``split="train"``, its partition less its held-out
    examples) or held-out evaluation split (``"eval"``), built once per process for a (setup,
    client, split) key."""
    key = (json.dumps(setup.to_config(), sort_keys=True), client_id, split)
    if key in _PARTITIONS:
        _PARTITIONS.move_to_end(key)
        return _PARTITIONS[key]
    base = cached_base_model(setup.model, setup.seed)  # for its tokenizer
    fed = cached_federated_data(setup.data, setup.model.task, setup.num_clients, setup.seed, setup.model.num_labels)
    examples = fed.client_eval(client_id) if split == "eval" else fed.partition(client_id)
    if split == "eval" and len(examples) == 0:
        raise ValueError(f"no held-out examples (data.client_eval_fraction = {setup.data.client_eval_fraction},"
                         f" partition of {len(fed.partition(client_id))})")
    _PARTITIONS[key] = tokenize(examples, base.tokenizer, setup.model.task, setup.model.max_length)
    while len(_PARTITIONS) > _MAX_PARTITIONS:
        _PARTITIONS.popitem(last=False)
    return _PARTITIONS[key]


def _worker_name() -> str:
    """The Ray node this client ran on (simulation), else the host name (deployment)."""
    try:
        import ray

        if ray.is_initialized():
            return f"ray:{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception as exc:  # noqa: BLE001 - informational only
        LOG.debug("no Ray node id: %s", exc)
    import socket

    return f"host:{socket.gethostname()}"




def load_prune_state(state: RecordDict) -> tuple[Masks | None, dict[int, dict[str, torch.Tensor]] | None]:
    """This client's masks and importance EMA from earlier rounds (its Flower node state)."""
    if NODE_STATE_PRUNE not in state.array_records:
        return None, None
    tensors = state.array_records[NODE_STATE_PRUNE].to_torch_state_dict()
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
    state[NODE_STATE_PRUNE] = ArrayRecord(tensors)


def reply_record(state: RecordDict, factors: Factors, head: dict[str, torch.Tensor], codec: str,
                 error_feedback: bool) -> ArrayRecord:
    """The reply's adapter record in ``codec``. With ``error_feedback`` and a lossy codec, the
    residual of the node's last reply (per tensor: value minus what the server decoded) is added
    first and the new residual saved in the node's ``state``; a tensor whose shape changed (a new
    rank) starts from zero. Otherwise any saved residual is dropped."""
    if not error_feedback or codec == "fp32":
        if RESIDUAL_STATE in state.array_records:
            del state[RESIDUAL_STATE]
        return factors_to_record(factors, head, codec)
    saved = state.array_records.get(RESIDUAL_STATE)
    residual = residual_from_record(saved) if saved is not None else None
    record, residual = encode_with_feedback(state_to_tensors(GlobalAdapter(adapter=factors, head=head)), codec,
                                            residual)
    state[RESIDUAL_STATE] = residual_to_record(residual)
    return record


def inject_fault(kind: str, factors: Factors) -> Factors:
    """A corrupted copy of an update, for fault-injection tests (``[faults]`` in the config)."""
    out = {m: (a.clone(), b.clone()) for m, (a, b) in factors.items()}
    first = min(out)
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


def _open_request(content: RecordDict, client_id: int) -> TrainRequest:
    """The message's request, checked to be addressed to ``client_id``; sets this process's torch
    threads and, on a GPU, the device class's share of its memory."""
    request = TrainRequest.from_config(content[CONFIG])
    torch.set_num_threads(request.setup.train.num_threads)
    if request.client_id != client_id:
        raise ValueError(f"message addressed to client {request.client_id}, this node is {client_id}")
    if request.gpu_fraction and torch.cuda.is_available():  # this device class's share of the GPU
        torch.cuda.set_per_process_memory_fraction(request.gpu_fraction)
    return request


def handle_train(content: RecordDict, node_config: dict[str, Any], state: RecordDict, client_id: int,
                 on_crash: Callable[[], None] | None = None) -> RecordDict:
    """Train on one message's content; returns the reply content (raises on any failure).

    ``state`` is the node's persistent state (pruning masks and importance live there, and the
    error-feedback residual of a lossy reply transport).
    """
    t0 = time.perf_counter()
    request = _open_request(content, client_id)
    setup = request.setup
    fault = request.fault
    if fault == "raise":
        raise RuntimeError(f"injected fault in round {request.server_round}")
    if fault == "crash":
        LOG.error("client %d: injected crash in round %d", client_id, request.server_round)
        (on_crash or (lambda: os._exit(3)))()
    t_setup = time.perf_counter()
    base = cached_base_model(setup.model, setup.seed)
    data = client_partition(setup, client_id)
    setup_s = time.perf_counter() - t_setup
    train_state = record_to_state(content[ARRAYS], request.transport_down)
    masks, scores = load_prune_state(state)
    result = train_local(base, train_state, request.rank, data, setup, train_a=request.train_a, seed=request.seed,
                         prune=request.prune, masks=masks, scores=scores)
    metrics = TrainMetrics(
        num_examples=result.num_examples, train_loss=result.train_loss, train_time_s=result.train_time_s,
        setup_s=setup_s, handle_time_s=time.perf_counter() - t0, steps=result.steps, tokens=result.tokens,
        loss_start=result.loss_start, loss_end=result.loss_end, rank=request.rank, client_id=client_id)
    factors = inject_fault(fault, result.factors) if fault else result.factors
    if fault == "hang":
        time.sleep(request.hang_s)
    if fault:  # an injected fault's reply is sent as it is; the error-feedback residual is left alone
        arrays = factors_to_record(factors, result.head, request.transport_up)
    else:
        arrays = reply_record(state, factors, result.head, request.transport_up, request.error_feedback)
    reply = RecordDict({ARRAYS: arrays,
                        INFO: ConfigRecord(ReplyInfo(worker=_worker_name(),
                                                     quantization=setup.model.quantization).to_config())})
    if result.masks is not None:
        save_prune_state(state, result.masks, result.scores)
        reply[MASKS] = ArrayRecord(masks_to_tensors(result.masks))
        if result.pruned_at is not None:
            reply[MASK_STEPS] = ArrayRecord(masks_to_tensors(result.pruned_at))
        metrics.prune_ratio, metrics.param_sparsity = result.sparsity, result.param_sparsity
    reply[METRICS] = MetricRecord(metrics.to_record())
    return reply


def evaluation_masks(state: RecordDict, content: RecordDict) -> Masks | None:
    """The masks a client evaluates under: its own (node state), else those the server last
    accepted from it (sent in the message's ``masks`` record, e.g. after a resumed run), else none."""
    masks, _ = load_prune_state(state)
    if masks is None and MASKS in content.array_records:
        masks = masks_from_tensors(content[MASKS].to_torch_state_dict())
    return masks


def handle_evaluate(content: RecordDict, node_config: dict[str, Any], state: RecordDict, client_id: int,
                    on_crash: Callable[[], None] | None = None) -> RecordDict:
    """Score the message's global adapter on this client's held-out split; returns the reply content
    (``metrics``: eval loss, accuracy or perplexity, ``num_examples``; ``info``). Raises on any failure,
    and when the client holds no evaluation example. ``state`` is read (masks), never changed."""
    t0 = time.perf_counter()
    request = _open_request(content, client_id)
    setup = request.setup
    base = cached_base_model(setup.model, setup.seed)
    data = client_partition(setup, client_id, "eval")
    masks = evaluation_masks(state, content)
    scores = evaluate_global(base, record_to_state(content[ARRAYS], request.transport_down), data, setup, masks=masks)
    metric = metric_for_task(setup.model.task)
    metrics = {"eval_loss": float(scores["eval_loss"]), metric.key: float(scores[metric.key]),
               "num_examples": len(data), "client_id": client_id, "rank": request.rank,
               "masked": int(masks is not None), "eval_time_s": time.perf_counter() - t0}
    info = ReplyInfo(worker=_worker_name(), quantization=setup.model.quantization)
    return RecordDict({METRICS: MetricRecord(metrics), INFO: ConfigRecord(info.to_config())})
