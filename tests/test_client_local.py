"""The client's work for one train message, in-process (what a Ray actor or a node's worker runs)."""

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.local import handle_train
from fedtune.core.config import config_from_dict
from fedtune.core.protocol import NODE_STATE_PRUNE as PRUNE_STATE
from fedtune.core.protocol import PruneSpec, TrainRequest, client_setup
from fedtune.lora.records import record_to_factors, state_to_record
from fedtune.models.loading import cached_base_model
from fedtune.training.local import head_state, lora_shapes
from strategies import HetLoRA


def message(quantization, prune_ratio=0.3, client_id=1, server_round=1):
    cfg = config_from_dict({"model": {"name": "tiny-bert", "max_length": 32}, "lora": {"ranks": [2]},
                            "data": {"partitioner": "iid", "eval_size": 32, "max_examples": 200},
                            "train": {"local_steps": 4, "batch_size": 8}, "prune": {"interval": 2},
                            "federation": {"num_clients": 4}})
    base = cached_base_model(cfg.model, cfg.seed)
    strat = HetLoRA(cfg)
    state = strat.initial_state(lora_shapes(base, cfg), head_state(base))
    payload = strat.client_payload(state, client_id, 2)
    prune = PruneSpec(target=prune_ratio, interval=cfg.prune.interval) if prune_ratio else None
    request = TrainRequest(server_round=server_round, client_id=client_id, rank=2, seed=7,
                           setup=client_setup(cfg, quantization), prune=prune)
    return RecordDict({"arrays": state_to_record(payload), "config": ConfigRecord(request.to_config())})


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_handle_train_on_the_base_width_the_server_chose(quantization):
    node_state = RecordDict()
    reply = handle_train(message(quantization), {}, node_state, client_id=1)
    factors, head = record_to_factors(reply["arrays"])
    assert factors and all(a.shape[0] == 2 and torch.isfinite(b).all() for a, b in factors.values())
    assert reply["info"]["quantization"] == quantization
    metrics = reply["metrics"]
    assert metrics["num_examples"] > 0 and metrics["steps"] == 4 and 0 < metrics["prune_ratio"] <= 0.3
    assert PRUNE_STATE in node_state.array_records  # masks persist in the node's state for the next round
    again = handle_train(message(quantization, server_round=2), {}, node_state, client_id=1)
    assert again["metrics"]["setup_s"] < 0.5  # base model and partition were cached in this process


def test_handle_train_refuses_a_message_for_another_client():
    with pytest.raises(ValueError, match="message addressed to client 1, this node is 3"):
        handle_train(message("none"), {}, RecordDict(), client_id=3)


def test_a_nodes_persistent_worker_keeps_the_model_loaded(tmp_path, monkeypatch):
    """clients/worker.py: the light ClientApp's path. The worker starts on first use (even under
    a directory too long for a Unix socket path), keeps the base model and data across messages,
    returns the node state, and reports a training failure naming its cause."""
    import os
    import signal

    from clients.worker import WorkerError, request_train, socket_path

    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / ("w" * 80)))
    state = RecordDict()
    try:
        first = request_train(message("none"), {}, state, client_id=1, node_id=42)
        second = request_train(message("none", server_round=2), {}, state, client_id=1, node_id=42)
        assert first["metrics"]["steps"] == 4 and PRUNE_STATE in state.array_records
        assert second["metrics"]["setup_s"] < 0.5  # the worker kept model and partition in memory
        with pytest.raises(WorkerError, match="ValueError: message addressed to client 1, this node is 3"):
            request_train(message("none"), {}, RecordDict(), client_id=3, node_id=42)
    finally:
        pid_file = socket_path(42).with_suffix(".pid")
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
