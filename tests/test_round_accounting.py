"""What a round charges, measures and deploys: the clock bills each local step at the masks in
force during it, evaluation under devices' masks is recorded beside the unmasked metric (and
reports read it), devices deploy at the rank they last trained at, sparsity has one unit, and
client-reported figures are bounded before the clock and the bandit see them."""

import json
import math

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)

from fedtune.core.config import config_from_dict
from fedtune.core.protocol import PruneSpec, TrainMetrics
from fedtune.data.batching import tokenize
from fedtune.data.partition import cached_federated_data
from fedtune.fleet.clock import FleetSimulator
from fedtune.lora.records import factors_to_record, state_to_record
from fedtune.models.loading import cached_base_model
from fedtune.pruning.masks import masks_to_tensors
from fedtune.pruning.structure import full_masks, model_structure
from fedtune.training.local import head_state, lora_shapes, train_local
from strategies import FedSpine, HetLoRA
from tests.conftest import FakeGrid, mock_reply

TINY = {"model": {"name": "tiny-bert", "max_length": 32}, "lora": {"ranks": [2]},
        "data": {"partitioner": "iid", "eval_size": 32, "max_examples": 200},
        "train": {"local_steps": 6, "batch_size": 4}, "prune": {"ratio": 0.5, "interval": 2},
        "federation": {"num_clients": 2, "fraction_train": 1.0},
        "fleet": {"devices": {"raspberry-pi-5": 2}, "simulate_availability": False}}


pytestmark = pytest.mark.usefixtures("task_identity")


def _fleet_strategy(cls=HetLoRA, **overrides):
    cfg = config_from_dict({**TINY, **overrides})
    base = cached_base_model(cfg.model, cfg.seed)
    structure = model_structure(base.model)
    fleet = FleetSimulator.from_config(cfg, base.model, structure)
    strat = cls(cfg, structure=structure, fleet=fleet)
    state = strat.initial_state(lora_shapes(base, cfg), head_state(base))
    list(strat.configure_train(1, state_to_record(state), ConfigRecord(), FakeGrid(2)))
    return cfg, strat, state, structure, fleet


def _prunedmock_reply(strat, state, structure, client, rank, steps_at, metrics):
    """A reply whose masks prune layer 0's first head before the round, then half of every layer's
    FFN channels and its second head after step ``steps_at``."""
    masks = full_masks(structure)
    pruned_at = {layer: {k: torch.where(t, -1, 0).to(torch.int32) for k, t in m.items()} for layer, m in masks.items()}
    masks[0]["attn"][0] = masks[0]["attn"][1] = False
    pruned_at[0]["attn"][0], pruned_at[0]["attn"][1] = 0, steps_at
    for layer, m in masks.items():
        half = len(m["ffn"]) // 2
        m["ffn"][:half] = False
        pruned_at[layer]["ffn"][:half] = steps_at
    payload = strat.client_payload(state, client, rank)
    content = RecordDict({"arrays": factors_to_record(payload.adapter, payload.head),
                          "metrics": MetricRecord(metrics.to_record()),
                          "masks": ArrayRecord(masks_to_tensors(masks)),
                          "mask_steps": ArrayRecord(masks_to_tensors(pruned_at))})
    return content, masks, pruned_at


def test_the_clock_charges_each_step_at_the_masks_in_force():
    cfg, strat, state, structure, fleet = _fleet_strategy(train={"local_steps": 600, "batch_size": 4})
    metrics = TrainMetrics(num_examples=10, train_loss=0.5, steps=600, tokens=600 * 4 * 32)
    content, end_masks, _ = _prunedmock_reply(strat, state, structure, 0, 2, 200, metrics)
    strat.aggregate_train(1, [mock_reply(100, content)])
    rec = {r["client_id"]: r for r in strat.round_result(1).clients}[0]
    start = full_masks(structure)
    start[0]["attn"][0] = False
    kw = dict(rank=2, steps=600, tokens=600 * 4 * 32, bytes_down=0, bytes_up=0)
    at_start, at_end = fleet.cost(0, 1, masks=start, **kw).compute_s, fleet.cost(0, 1, masks=end_masks, **kw).compute_s
    expected = (200 * at_start + 400 * at_end) / 600  # steps 1-200 before the event after step 200, then 400 after
    assert at_start > at_end
    assert rec["sim_compute_s"] == pytest.approx(expected, abs=2e-3)
    assert rec["sim_compute_s"] > at_end * 1.05  # not billed at the end-of-round sparsity


def test_inconsistent_pruning_steps_are_rejected():
    cfg, strat, state, structure, fleet = _fleet_strategy()
    metrics = TrainMetrics(num_examples=10, train_loss=0.5, steps=6, tokens=100)
    content, masks, pruned_at = _prunedmock_reply(strat, state, structure, 0, 2, 2, metrics)
    pruned_at[0]["attn"][3] = 4  # a kept head with a pruning step
    content["mask_steps"] = ArrayRecord(masks_to_tensors(pruned_at))
    strat.aggregate_train(1, [mock_reply(100, content)])
    rec = {r["client_id"]: r for r in strat.round_result(1).clients}[0]
    assert rec["status"] == "rejected" and "inconsistent with its masks" in rec["reason"]


def test_client_figures_are_bounded_before_the_clock_sees_them():
    cfg, strat, state, structure, fleet = _fleet_strategy()
    hostile = MetricRecord({"num_examples": 10, "train_loss": 0.5, "steps": float("inf"), "tokens": -5,
                            "train_time_s": float("nan"), "prune_ratio": 7.0})
    payload = strat.client_payload(state, 0, 2)
    content = RecordDict({"arrays": factors_to_record(payload.adapter, payload.head), "metrics": hostile})
    strat.aggregate_train(1, [mock_reply(100, content)])
    rec = {r["client_id"]: r for r in strat.round_result(1).clients}[0]
    assert rec["status"] == "ok" and math.isfinite(rec["sim_seconds"]) and rec["sim_seconds"] > 0
    assert math.isnan(rec["train_time_s"]) and rec["prune_ratio"] == 0.0
    worst = 6 * cfg.train.batch_size * cfg.model.max_length  # an impossible count is taken at its bound
    expected = fleet.cost(0, 1, rank=2, masks=None, steps=6, tokens=worst, bytes_down=0, bytes_up=0).compute_s
    assert rec["sim_compute_s"] == pytest.approx(expected, abs=2e-3)  # the configured steps


def test_a_device_deploys_at_the_rank_it_last_trained_at():
    overrides = {"federation": {"num_clients": 2, "fraction_train": 1.0, "strategy": "fedspine"},
                 "policy": {"name": "random", "ranks": [2, 4, 8], "ratios": [0.0]}}
    cfg, strat, state, structure, fleet = _fleet_strategy(FedSpine, **overrides)
    ranks = {c: strat.rank_for(c, 1) for c in (0, 1)}
    replies = []
    for c in (0, 1):
        payload = strat.client_payload(state, c, ranks[c])
        replies.append(mock_reply(100 + c, RecordDict({
            "arrays": factors_to_record(payload.adapter, payload.head),
            "metrics": MetricRecord(TrainMetrics(num_examples=5, train_loss=0.4, steps=6, tokens=64).to_record())})))
    strat.aggregate_train(1, replies)
    strat.round_result(1)
    assigned = []
    strat.policy.assign = lambda cid, rnd: assigned.append(cid)  # a fresh draw would show here
    assert {c: strat.deploy_rank(c) for c in (0, 1)} == ranks and not assigned
    restored = FedSpine(cfg, structure=structure, fleet=fleet)
    restored.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    assert {c: restored.deploy_rank(c) for c in (0, 1)} == ranks  # survives a resume


def test_reported_sparsity_is_structural_and_reaches_the_target():
    from fedtune.pruning.masks import structural_sparsity

    cfg = config_from_dict({**TINY, "fleet": {}})
    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, 2, cfg.seed, cfg.model.num_labels)
    data = tokenize(fed.partition(0), base.tokenizer, cfg.model.task, cfg.model.max_length)
    state = HetLoRA(cfg).initial_state(lora_shapes(base, cfg), head_state(base))
    res = train_local(base, state, 2, data, cfg, seed=0, prune=PruneSpec(target=0.5, interval=2, skip_layers=(0,)))
    assert res.sparsity == pytest.approx(0.5, abs=0.05)  # the target's unit: heads and channels of prunable layers
    assert res.sparsity == pytest.approx(structural_sparsity(res.masks, (0,)))
    assert res.param_sparsity < 0.4  # layer 0 is never pruned: a parameter fraction would miss the target
    ats = [int(v) for m in res.pruned_at.values() for t in m.values() for v in t.tolist() if v > 0]
    assert ats and set(ats) <= {2, 4, 6}  # pruning events after steps 2, 4, 6


def test_masked_evaluation_is_recorded_and_reports_read_it(tmp_path):
    from fedtune.reporting.comparison import run_stats
    from fedtune.round.loop import masked_evaluation, setup

    cfg = config_from_dict({**TINY, "fleet": {}})
    run = setup(cfg, tmp_path / "run")
    state = run.strategy.initial_state(lora_shapes(run.base, cfg), head_state(run.base))
    gen = torch.Generator().manual_seed(0)
    state.adapter = {m: (a, torch.randn(b.shape, generator=gen) * 0.5) for m, (a, b) in state.adapter.items()}
    masks = full_masks(run.structure)
    for m in masks.values():
        m["attn"][: len(m["attn"]) // 2] = False
    run.strategy.client_masks = {1: masks}
    unmasked = run.evaluate(state)
    out = masked_evaluation(run, state, unmasked, sampled=[0, 1])
    direct = run.evaluate(state, masks)
    assert out["masked_eval_clients"] == [1] and out["masked_eval_accuracy"] == direct["eval_accuracy"]
    assert out["masked_eval_loss"] != unmasked["eval_loss"]
    assert masked_evaluation(run, state, unmasked, sampled=[0])["masked_eval_accuracy"] == unmasked["eval_accuracy"]
    # a report measures time to target on the masked metric by default
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lines = [{"round": 0, "sim_time_s": 0.0, "eval_accuracy": 0.5, "masked_eval_accuracy": 0.5, "clients": []},
             {"round": 1, "sim_time_s": 10.0, "eval_accuracy": 0.8, "masked_eval_accuracy": 0.6, "clients": []},
             {"round": 2, "sim_time_s": 20.0, "eval_accuracy": 0.8, "masked_eval_accuracy": 0.8, "clients": []}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_stats(run_dir, target=0.75)["time_to_target_s"] == 20.0
    assert run_stats(run_dir, target=0.75, prefer_masked=False)["time_to_target_s"] == 10.0
