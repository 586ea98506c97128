"""Federated evaluation: each client's held-out split (disjoint from what it trains on, seeded),
the strategy's evaluate messages and reply records, the client's evaluate handler (in-process
and through a node's worker), and the example-weighted summary per device class."""

import collections
import math
import threading
import time

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    MessageType,
    MetricRecord,
    RecordDict,
)

from clients.local import handle_evaluate, handle_train, load_prune_state
from fedtune.core.config import ConfigError, DataConfig, config_from_dict
from fedtune.core.protocol import (
    NODE_STATE_PRUNE,
    PruneSpec,
    TrainRequest,
    client_setup,
)
from fedtune.data.partition import FederatedData, client_eval_count, client_eval_indices
from fedtune.lora.records import record_to_state, state_to_record
from fedtune.models.loading import cached_base_model
from fedtune.pruning.masks import masks_to_tensors
from fedtune.reporting.comparison import client_eval_table
from fedtune.training.local import head_state, lora_shapes
from strategies import HetLoRA
from strategies.base import client_eval_summary
from tests.conftest import FakeGrid
from tests.conftest import mock_reply as reply

DATA = {"partitioner": "iid", "eval_size": 32, "max_examples": 240}


def fed_data(fraction, seed=0, clients=4, **data):
    cfg = DataConfig(**{**DATA, **data, "client_eval_fraction": fraction})
    return FederatedData(cfg, "classification", clients, seed, 2)


# ----------------------------------------------------------------------------- the client's split


def test_client_eval_split_is_disjoint_from_training_and_deterministic():
    fed, again, other_seed = fed_data(0.2), fed_data(0.2), fed_data(0.2, seed=1)
    plain = fed_data(0.0)
    for cid in range(4):
        full = fed._full_partition(cid)
        train, held = fed.partition(cid), fed.client_eval(cid)
        assert len(held) == client_eval_count(len(full), 0.2) == int(len(full) * 0.2) > 0
        # train and held-out split the partition exactly: no example in both, none lost
        rows = collections.Counter(zip(full["text"], full["label"]))
        assert collections.Counter(zip(train["text"], train["label"])) + \
            collections.Counter(zip(held["text"], held["label"])) == rows
        held_pos = set(client_eval_indices(len(full), 0.2, 0, cid))
        assert train["text"] == [full["text"][i] for i in range(len(full)) if i not in held_pos]
        assert not set(train["text"]) & set(held["text"])
        assert held["text"] == again.client_eval(cid)["text"]  # same seed, new process state: same split
        assert fed.partition_size(cid) == len(train)  # the server's example cap counts training examples
        assert plain.partition(cid)["text"] == full["text"] and len(plain.client_eval(cid)) == 0
    assert any(fed.client_eval(c)["text"] != other_seed.client_eval(c)["text"] for c in range(4))
    assert fed.client_eval(0)["text"] != fed.client_eval(1)["text"]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.9])
def test_eval_count_bounds_and_the_servers_cap(fraction):
    strat = HetLoRA(config_from_dict({"data": {"client_eval_fraction": fraction}}))
    for size in range(0, 400, 7):
        n = client_eval_count(size, fraction)
        assert (n == 0) if size < 2 else (1 <= n <= size - 1)
        strat._partition_sizes.clear()
        strat.partition_size = lambda cid, t=size - n: t  # the training split the server knows
        if size >= 2:  # an honest count passes; the cap is the honest count to within one training example's share
            assert n <= strat.eval_examples_cap(0) <= n + 1 + fraction / (1 - fraction)


def test_config_keys_are_validated():
    with pytest.raises(ConfigError, match="data.client_eval_fraction"):
        config_from_dict({"data": {"client_eval_fraction": 1.0}})
    with pytest.raises(ConfigError, match="federation.evaluate_clients: clients evaluate on a held-out"):
        config_from_dict({"federation": {"evaluate_clients": 2}})
    with pytest.raises(ConfigError, match="federation.evaluate_clients: must be in"):
        config_from_dict({"federation": {"num_clients": 4, "evaluate_clients": 5},
                          "data": {"client_eval_fraction": 0.1}})
    with pytest.raises(ConfigError, match="federation.evaluate_clients_every"):
        config_from_dict({"federation": {"evaluate_clients_every": 0}})


# ----------------------------------------------------------------------------- aggregation per class


def _rec(cid, device, n, loss, acc=None, status="ok"):
    r = {"client_id": cid, "device": device, "status": status}
    if status == "ok":
        r.update({"num_examples": n, "eval_loss": loss, **({"eval_accuracy": acc} if acc is not None else {})})
    return r


def test_client_eval_summary_weights_by_examples_per_device_class():
    records = [_rec(0, "tx2", 10, 0.5, 0.6), _rec(1, "tx2", 30, 0.7, 0.8), _rec(2, "agx", 5, 0.2, 1.0),
               _rec(3, "agx", 0, 0, status="failed"), {"client_id": 4, "device": "tx2", "status": "rejected"}]
    out = client_eval_summary(records)
    assert set(out) == {"tx2", "agx", "all"}
    tx2, agx, every = out["tx2"], out["agx"], out["all"]
    assert (tx2["clients"], tx2["failed"], tx2["num_examples"]) == (2, 1, 40)
    assert tx2["eval_loss"] == pytest.approx((10 * 0.5 + 30 * 0.7) / 40)
    assert tx2["eval_accuracy"] == pytest.approx((10 * 0.6 + 30 * 0.8) / 40)
    assert (agx["clients"], agx["failed"], agx["eval_accuracy"]) == (1, 1, 1.0)
    assert (every["clients"], every["failed"], every["num_examples"]) == (3, 2, 45)
    assert every["eval_accuracy"] == pytest.approx((6 + 24 + 5) / 45)
    # a causal LM: perplexity of the pooled examples = exp(weighted mean loss); no fleet: one class
    lm = client_eval_summary([_rec(0, None, 1, 2.0), _rec(1, None, 3, 4.0)])
    assert set(lm) == {"all"} and lm["all"]["eval_perplexity"] == pytest.approx(math.exp(3.5))
    failed_only = client_eval_summary([_rec(0, "tx2", 0, 0, status="failed")])
    assert failed_only["tx2"] == {"clients": 0, "failed": 1, "num_examples": 0}


def test_report_prints_the_per_class_table():
    run = {"method": "hetlora", "seed": 0,
           "client_eval": {"round": 3, "by_device": client_eval_summary([_rec(0, "tx2", 10, 0.5, 0.6),
                                                                          _rec(1, "agx", 5, 0.25, 0.4)])}}
    lines = client_eval_table([run, {"method": "other", "seed": 1, "client_eval": None}])
    rows = [line for line in lines if line.startswith("| hetlora")]
    assert rows == ["| hetlora (seed 0) | 3 | agx | 1/1 | 5 | 0.2500 | 0.4000 |",
                    "| hetlora (seed 0) | 3 | all | 2/2 | 15 | 0.4167 | 0.5333 |",
                    "| hetlora (seed 0) | 3 | tx2 | 1/1 | 10 | 0.5000 | 0.6000 |"]
    assert client_eval_table([{"method": "x", "seed": 0, "client_eval": None}]) == []


# ----------------------------------------------------------------------------- the strategy's messages

SHAPES = {"enc.0.q": (6, 5), "enc.0.v": (6, 5)}
HEAD = {"classifier.weight": torch.zeros(2, 5)}


def strategy(evaluate_clients=3, every=2, rounds=5):
    cfg = config_from_dict({"seed": 3, "lora": {"ranks": [2, 4]}, "data": {"client_eval_fraction": 0.25},
                            "federation": {"num_clients": 6, "num_rounds": rounds, "evaluate_clients": evaluate_clients,
                                           "evaluate_clients_every": every}})
    strat = HetLoRA(cfg, partition_size=lambda cid: 30)
    strat.set_state(strat.initial_state(SHAPES, HEAD))
    return strat


@pytest.mark.usefixtures("task_identity")
def test_configure_evaluate_samples_seeded_nodes_and_sends_deployed_ranks():
    strat = strategy()
    arrays = state_to_record(strat.current)
    assert [r for r in range(1, 6) if strat.evaluates_clients(r)] == [2, 4, 5]  # every 2nd and the last
    assert list(strat.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid(6))) == []
    strat.trained_rank[1] = 4  # client 1 last trained at rank 4 (its static rank is 4 as well)
    strat.client_masks[2] = {0: {"heads": torch.tensor([True, False])}}
    msgs = list(strat.configure_evaluate(2, arrays, ConfigRecord({}), FakeGrid(6)))
    again = list(strategy().configure_evaluate(2, arrays, ConfigRecord({}), FakeGrid(6)))
    assert len(msgs) == 3 and [m.metadata.dst_node_id for m in msgs] == [m.metadata.dst_node_id for m in again]
    for m in msgs:
        cid = m.metadata.dst_node_id - 100
        assert m.metadata.message_type == MessageType.EVALUATE
        request = TrainRequest.from_config(m.content["config"])
        assert request.client_id == cid and request.server_round == 2 and request.fault is None
        assert request.rank == strat.deploy_rank(cid) == (2, 4)[cid % 2]
        a, _ = record_to_state(m.content["arrays"]).adapter["enc.0.q"]
        assert a.shape == (request.rank, 5)
        assert ("masks" in m.content.array_records) == (cid == 2)


@pytest.mark.usefixtures("task_identity")
def test_aggregate_evaluate_records_failed_malformed_and_missing_clients():
    strat = strategy(evaluate_clients=6)
    msgs = list(strat.configure_evaluate(2, state_to_record(strat.current), ConfigRecord({}), FakeGrid(6)))
    nodes = [m.metadata.dst_node_id for m in msgs]

    def metrics(n=8, loss=0.6, acc=0.75):
        return RecordDict({"metrics": MetricRecord({"num_examples": n, "eval_loss": loss, "eval_accuracy": acc,
                                                    "masked": 0})})

    replies = [reply(nodes[0], metrics()), reply(nodes[1], metrics(n=2, loss=0.2, acc=0.5)),
               reply(nodes[2], error="client 2: RuntimeError: out of memory"),
               reply(nodes[3], metrics(acc=1.5)), reply(nodes[4], metrics(n=10_000)),
               reply(nodes[1], metrics(n=9))]  # a duplicate reply counts once
    agg = strat.aggregate_evaluate(2, replies)  # node 5 never replies (timed out)
    recs = {r["client_id"]: r for r in strat._eval_records}
    assert [recs[c]["status"] for c in range(6)] == ["ok", "ok", "failed", "rejected", "rejected", "failed"]
    assert "out of memory" in recs[2]["reason"] and "eval_accuracy 1.5" in recs[3]["reason"]
    assert "num_examples 10000" in recs[4]["reason"] and recs[5]["reason"] == "no reply before the round timeout"
    assert recs[0]["num_examples"] == 8 and recs[0]["eval_accuracy"] == 0.75 and recs[1]["rank"] == 4
    assert agg["num_examples"] == 10 and agg["eval_accuracy"] == pytest.approx((8 * 0.75 + 2 * 0.5) / 10)
    assert strat.aggregate_evaluate(2, [reply(nodes[0], error="x")]) is None  # nothing accepted


class EvalGrid(FakeGrid):
    """Answers evaluate messages with fixed metrics; drops one node's message (a timeout)."""

    def __init__(self, n, silent):
        super().__init__(n)
        self.silent = silent

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type != MessageType.EVALUATE:
            return super().send_and_receive(messages, timeout)
        self.sent.append(messages)
        return [reply(m.metadata.dst_node_id, RecordDict({"metrics": MetricRecord(
            {"num_examples": 4, "eval_loss": 0.5, "eval_accuracy": 0.5})}))
            for m in messages if m.metadata.dst_node_id != self.silent]


@pytest.mark.usefixtures("task_identity")
def test_federated_evaluate_runs_the_phase_only_in_its_rounds():
    strat, grid = strategy(evaluate_clients=6), EvalGrid(6, silent=103)
    arrays = state_to_record(strat.current)
    assert strat.federated_evaluate(grid, 1, arrays) == [] and grid.sent == []
    recs = strat.federated_evaluate(grid, 2, arrays)
    assert [r["status"] for r in recs] == ["ok", "ok", "ok", "failed", "ok", "ok"]


# ----------------------------------------------------------------------------- the client's handler


def _setup():
    cfg = config_from_dict({"model": {"name": "tiny-bert", "max_length": 32}, "lora": {"ranks": [2]},
                            "data": {**DATA, "client_eval_fraction": 0.25}, "prune": {"interval": 2},
                            "train": {"local_steps": 4, "batch_size": 8}, "federation": {"num_clients": 4}})
    base = cached_base_model(cfg.model, cfg.seed)
    strat = HetLoRA(cfg)
    state = strat.initial_state(lora_shapes(base, cfg), head_state(base))
    gen = torch.Generator().manual_seed(0)
    state.head = {k: torch.randn(v.shape, generator=gen) for k, v in state.head.items()}  # a non-trivial head
    return cfg, strat, state


def _content(cfg, strat, state, cid=1, prune=None, server_round=1):
    request = TrainRequest(server_round=server_round, client_id=cid, rank=2, seed=7, setup=client_setup(cfg),
                           prune=prune)
    return RecordDict({"arrays": state_to_record(strat.client_payload(state, cid, 2)),
                       "config": ConfigRecord(request.to_config())})


def test_handle_evaluate_scores_the_clients_held_out_split_under_its_masks():
    cfg, strat, state = _setup()
    fed = FederatedData(cfg.data, "classification", 4, cfg.seed, 2)
    node = RecordDict()
    dense = handle_evaluate(_content(cfg, strat, state), {}, node, client_id=1)["metrics"]
    assert dense["num_examples"] == len(fed.client_eval(1)) > 0 and dense["masked"] == 0
    assert 0.0 <= dense["eval_accuracy"] <= 1.0 and math.isfinite(dense["eval_loss"])
    with pytest.raises(ValueError, match="message addressed to client 1, this node is 2"):
        handle_evaluate(_content(cfg, strat, state), {}, node, client_id=2)
    # after a pruning round the node's own masks apply, and evaluation leaves the node state alone
    handle_train(_content(cfg, strat, state, prune=PruneSpec(target=0.5, interval=2)), {}, node, client_id=1)
    saved = dict(node.array_records[NODE_STATE_PRUNE].to_torch_state_dict())
    pruned = handle_evaluate(_content(cfg, strat, state, server_round=2), {}, node, client_id=1)["metrics"]
    assert pruned["masked"] == 1 and pruned["eval_loss"] != pytest.approx(dense["eval_loss"])
    assert all(torch.equal(saved[k], v) for k, v in node.array_records[NODE_STATE_PRUNE].to_torch_state_dict().items())
    # a node that lost its state evaluates under the masks the server sends
    masks, _ = load_prune_state(node)
    content = _content(cfg, strat, state, server_round=2)
    content["masks"] = ArrayRecord(masks_to_tensors(masks))
    fresh = handle_evaluate(content, {}, RecordDict(), client_id=1)["metrics"]
    assert fresh["masked"] == 1 and fresh["eval_loss"] == pytest.approx(pruned["eval_loss"])


def test_the_clientapp_turns_a_failed_evaluation_into_an_error_reply(task_identity):
    from flwr.app import Message

    from clients.app import evaluate

    cfg, strat, state = _setup()
    content = _content(cfg, strat, state, cid=3)
    content["config"]["setup.data"] = content["config"]["setup.data"].replace('"client_eval_fraction": 0.25',
                                                                              '"client_eval_fraction": 0.0')
    msg = Message(content, dst_node_id=0, message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    out = evaluate(msg, context)
    assert out.has_error() and "client 3: ValueError: no held-out examples" in out.error.reason


def test_a_nodes_worker_serves_evaluate_requests(tmp_path, monkeypatch):
    from clients.worker import WorkerError, ping, request_train, serve, socket_path

    def fake_train(content, node_config, state, client_id, on_crash=None):
        return RecordDict({"metrics": MetricRecord({"trained": 1})})

    def fake_evaluate(content, node_config, state, client_id, on_crash=None):
        return RecordDict({"metrics": MetricRecord({"evaluated": client_id})})

    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / "w"))
    for node, handlers in ((11, {"handler": fake_train, "evaluate": fake_evaluate}), (12, {"handler": fake_train})):
        threading.Thread(target=serve, args=(socket_path(node), 3.0), kwargs=handlers, daemon=True).start()
        deadline = time.monotonic() + 10
        while True:
            try:
                ping(node)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    out = request_train(RecordDict(), {}, RecordDict(), client_id=5, node_id=11, op="evaluate")
    assert dict(out["metrics"]) == {"evaluated": 5}
    assert dict(request_train(RecordDict(), {}, RecordDict(), client_id=5, node_id=11)["metrics"]) == {"trained": 1}
    with pytest.raises(WorkerError, match="serves no evaluate requests"):
        request_train(RecordDict(), {}, RecordDict(), client_id=5, node_id=12, op="evaluate")
    with pytest.raises(ValueError, match="op must be one of"):
        request_train(RecordDict(), {}, RecordDict(), client_id=5, node_id=11, op="nap")


def test_evaluation_examples_never_reach_training():
    """The client's tokenised training split holds none of its held-out examples."""
    from clients.local import client_partition

    cfg, _, _ = _setup()
    setup = client_setup(cfg)
    train, held = client_partition(setup, 1), client_partition(setup, 1, "eval")
    train_rows, held_rows = ({tuple(ids) for ids in t.input_ids} for t in (train, held))
    assert held_rows and not train_rows & held_rows
