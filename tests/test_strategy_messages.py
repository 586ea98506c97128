"""The strategy's Flower plumbing with mock replies (no network): per-node messages,
seeded sampling, and rejection of failed, malformed or non-finite client updates."""


import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)

from fedtune.core.config import config_from_dict
from fedtune.core.protocol import TrainMetrics, TrainRequest
from fedtune.lora.factors import dense_delta
from fedtune.lora.records import factors_to_record, record_to_state, state_to_record
from strategies import HetLoRA
from tests.conftest import FakeGrid
from tests.conftest import mock_reply as reply

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"enc.0.q": (6, 5), "enc.0.v": (6, 5)}
HEAD = {"classifier.weight": torch.zeros(2, 5)}


def good_content(rank, gen, n=10, scale=1.0):
    factors = {m: (torch.randn(rank, i, generator=gen) * scale, torch.randn(o, rank, generator=gen))
               for m, (o, i) in SHAPES.items()}
    head = {"classifier.weight": torch.ones(2, 5)}
    metrics = TrainMetrics(num_examples=n, train_loss=0.5).to_record()
    return factors, RecordDict({"arrays": factors_to_record(factors, head), "metrics": MetricRecord(metrics)})


def setup(num_clients=4, ranks=(2, 4), structure=None):
    cfg = config_from_dict({"seed": 3, "lora": {"ranks": list(ranks)},
                            "federation": {"num_clients": num_clients, "fraction_train": 1.0}})
    strat = HetLoRA(cfg, structure=structure)
    state = strat.initial_state(SHAPES, HEAD)
    return strat, state


def test_configure_train_sends_each_node_its_rank_projection():
    strat, state = setup()
    grid = FakeGrid(4)
    msgs = list(strat.configure_train(1, state_to_record(state), ConfigRecord({"extra": "x"}), grid))
    assert len(msgs) == 4
    for m in msgs:
        client = m.metadata.dst_node_id - 100
        rank = (2, 4)[client % 2]
        cfg = m.content["config"]
        request = TrainRequest.from_config(cfg)
        assert request.client_id == client and request.rank == rank and request.server_round == 1
        assert request.setup.train == strat.experiment.train and request.prune is None
        assert cfg["extra"] == "x"  # the loop's own config entries travel beside the request
        payload = record_to_state(m.content["arrays"])
        a, b = payload.adapter["enc.0.q"]
        assert a.shape == (rank, 5) and b.shape == (6, rank)
        torch.testing.assert_close(a, state.adapter["enc.0.q"][0][:rank])
    arrays, _ = strat.aggregate_train(1, [])
    assert arrays is None and strat.round_result(1).bytes_down > 0


def test_sampling_is_seeded_and_respects_the_fraction():
    cfg = config_from_dict({"seed": 3, "federation": {"num_clients": 20, "fraction_train": 0.25}})
    picks = []
    for _ in range(2):
        strat = HetLoRA(cfg)
        grid = FakeGrid(20)
        picks.append([strat.sample_nodes(grid, r) for r in (1, 2)])
    assert picks[0] == picks[1]
    assert len(picks[0][0]) == 5 and picks[0][0] != picks[0][1]


def test_aggregate_rejects_bad_updates_and_keeps_the_round_going(gen):
    strat, state = setup()
    grid = FakeGrid(4)
    list(strat.configure_train(1, state_to_record(state), ConfigRecord(), grid))
    good_factors, good = good_content(2, gen)  # client 0 has rank 2
    _, nan = good_content(4, gen)
    nan_factors = record_to_state(nan["arrays"])
    nan_factors.adapter["enc.0.v"][1][0, 0] = float("nan")
    nan_rec = RecordDict({"arrays": state_to_record(nan_factors), "metrics": nan["metrics"]})
    _, wrong_rank = good_content(4, gen)  # client 2 must answer at rank 2
    replies = [reply(100, good), reply(101, nan_rec), reply(102, wrong_rank)]  # client 3 never answers
    arrays, metrics = strat.aggregate_train(1, replies)
    recs = {r["client_id"]: r for r in strat.round_result(1).clients}
    assert recs[0]["status"] == "ok"
    assert recs[1]["status"] == "rejected" and "non-finite values in enc.0.v.B" in recs[1]["reason"]
    assert recs[2]["status"] == "rejected" and "expected (2, 5)" in recs[2]["reason"]
    assert recs[3]["status"] == "failed" and "no reply" in recs[3]["reason"]
    new = record_to_state(arrays)
    for m, (a, b) in good_factors.items():  # only the good client contributed
        torch.testing.assert_close(dense_delta(*new.adapter[m]), b @ a)
    assert metrics["num_ok"] == 1


def test_a_crashed_client_is_recorded_and_all_bad_keeps_the_adapter(gen):
    strat, state = setup(num_clients=2)
    grid = FakeGrid(2)
    list(strat.configure_train(1, state_to_record(state), ConfigRecord(), grid))
    broken = RecordDict({"arrays": ArrayRecord({"junk": torch.zeros(1)}),
                         "metrics": MetricRecord({"num_examples": 3})})
    arrays, metrics = strat.aggregate_train(1, [reply(100, error="client 0: RuntimeError: boom"),
                                                reply(101, broken)])
    assert arrays is None and metrics is None
    recs = {r["client_id"]: r for r in strat.round_result(1).clients}
    assert recs[0]["status"] == "failed" and "boom" in recs[0]["reason"]
    assert recs[1]["status"] == "rejected" and "extra ['junk']" in recs[1]["reason"]


def test_masks_that_do_not_match_the_model_are_rejected(gen):
    from fedtune.pruning.masks import masks_to_tensors
    from fedtune.pruning.structure import LayerStructure, full_masks

    structure = [LayerStructure(layer=0, attn_in=("enc.0.q",), attn_out="", attn_rows={"enc.0.q": 3},
                                num_units=2, ffn_in=(), ffn_out="", ffn_dim=4)]
    strat, state = setup(num_clients=2, ranks=(2,), structure=structure)
    grid = FakeGrid(2)
    list(strat.configure_train(1, state_to_record(state), ConfigRecord(), grid))
    factors, good = good_content(2, gen)
    masks = full_masks(strat.structure)
    masks[0]["attn"][1] = False
    good["masks"] = ArrayRecord(masks_to_tensors(masks))
    _, bad = good_content(2, gen)
    wrong = full_masks(strat.structure)
    wrong[0]["ffn"] = torch.ones(7, dtype=torch.bool)
    bad["masks"] = ArrayRecord(masks_to_tensors(wrong))
    strat.aggregate_train(1, [reply(100, good), reply(101, bad)])
    recs = {r["client_id"]: r for r in strat.round_result(1).clients}
    assert recs[0]["status"] == "ok" and recs[0]["prune_ratio"] == 0.0
    assert recs[1]["status"] == "rejected" and "mask::0::ffn has shape (7,), expected (4,)" in recs[1]["reason"]
    assert torch.equal(strat.client_masks[0][0]["attn"], torch.tensor([True, False]))
