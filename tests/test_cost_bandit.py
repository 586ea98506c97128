"""The cost-aware bandit (cost-ucb): speeds from reported seconds, the round-time bound, cold starts,
its place in the registry and the fedspine strategy, and its ordering against S-UCB in the cost-only
simulator on a fleet with hidden heterogeneity."""

import json
import math

import numpy as np
import pytest

from fedtune.core.config import ConfigError, config_from_dict, load_config
from fedtune.core.protocol import ClientKey as K
from fedtune.core.protocol import Status
from fedtune.fleet.policies import POLICIES, Arm, CostUCB, Policy, make_policy

RATIOS, RANKS = [0.15, 0.3], [4, 8, 16]
FLOPS = {4: 1.0e11, 8: 1.1e11, 16: 1.3e11}  # per client-round, by rank
BYTES = {4: 1.0e6, 8: 2.0e6, 16: 4.0e6}


def record(client, arm, flop_rate, byte_rate, *, loss_drop=0.05, status=Status.OK, reason=None, sparsity=0.3):
    flops, nbytes = FLOPS[arm.rank], BYTES[arm.rank]
    rec = {K.CLIENT_ID: client, K.STATUS: status, K.ARM: {"ratio": arm.ratio, "rank": arm.rank},
           K.FLOPS: flops, K.SIM_COMPUTE_S: flops / flop_rate, K.COMM_BYTES: nbytes, K.SIM_COMM_S: nbytes / byte_rate,
           K.SIM_SECONDS: flops / flop_rate + nbytes / byte_rate, K.LOSS_START: 1.0, K.TRAIN_LOSS: 1.0 - loss_drop,
           K.PRUNE_RATIO: sparsity}
    if reason:
        rec[K.REASON] = reason
    return rec


def true_seconds(arm, flop_rate, byte_rate):
    return FLOPS[arm.rank] / flop_rate + BYTES[arm.rank] / byte_rate


SPEEDS = {c: (1e11 * 2.0 ** (c % 4 - 1), 1e6 * 2.0 ** (c % 5 - 2)) for c in range(20)}  # 8x compute, 16x link spread


def warm(policy, rounds=3):
    """Every arm played by every client once, reported with its true seconds."""
    arms = [Arm(p, r) for p in RATIOS for r in RANKS]
    for t in range(1, rounds + 1):
        policy.observe_round(t, [record(c, arms[(c + t) % len(arms)], *SPEEDS[c]) for c in SPEEDS])
    return policy


def test_cost_ucb_is_registered_and_takes_its_bound_from_the_policy_section():
    assert POLICIES["cost-ucb"] is CostUCB
    policy = make_policy("cost-ucb", ratios=RATIOS, ranks=RANKS, seed=1)
    assert isinstance(policy, Policy)
    from strategies.fedspine import build_policy

    cfg = load_config(None, ['policy.name="cost-ucb"', "policy.ratios=[0.15, 0.3]", "policy.round_time_bound=2.5",
                             "policy.round_time_bound_s=7.0"])
    built = build_policy(cfg)
    assert isinstance(built, CostUCB) and built.bound == 2.5 and built.bound_s == 7.0
    with pytest.raises(ConfigError, match="policy.round_time_bound"):
        config_from_dict({"policy": {"round_time_bound": 0.5}})
    with pytest.raises(ConfigError, match="policy.round_time_bound_s"):
        config_from_dict({"policy": {"round_time_bound_s": -1.0}})


def test_learns_each_devices_speed_from_the_seconds_it_reports():
    policy = warm(CostUCB(RANKS, RATIOS))
    for c, (fr, br) in SPEEDS.items():
        for arm in (Arm(0.15, 4), Arm(0.3, 16)):
            assert policy.predict(c, arm) == pytest.approx(true_seconds(arm, fr, br), rel=1e-9)
    # a device that slows down (drift) is followed by the moving average
    slow = {5: (SPEEDS[5][0] / 4, SPEEDS[5][1] / 4)}
    before = policy.predict(5, Arm(0.3, 4))
    for t in range(4, 10):
        policy.observe_round(t, [record(5, Arm(0.3, 4), *slow[5])])
    assert policy.predict(5, Arm(0.3, 4)) == pytest.approx(4 * before, rel=0.05)


def test_an_arm_nobody_played_is_priced_conservatively_from_the_nearest_played_one():
    policy = CostUCB(RANKS, RATIOS)
    policy.observe_round(1, [record(0, Arm(0.3, 4), 1e11, 1e6)])
    # rank 16 not seen: its work is rank 4's scaled by 16 / 4, never below the truth here
    assert policy.predict(0, Arm(0.3, 16)) == pytest.approx(4 * true_seconds(Arm(0.3, 4), 1e11, 1e6))
    assert policy.predict(0, Arm(0.3, 16)) >= true_seconds(Arm(0.3, 16), 1e11, 1e6)


def test_unseen_devices_start_at_the_cheapest_arm():
    policy = CostUCB(RANKS, RATIOS)
    # nothing observed: the smallest rank at the largest ratio
    assert [policy.assign(c, 1) for c in range(3)] == [Arm(0.3, 4)] * 3
    warm(policy)
    policy.begin_round(4, [0, 1, 99])
    times = {arm: policy.predict(99, arm, fleet_median=True) for arm in policy.arms}
    arm = policy.assign(99, 4)
    assert times[arm] == min(times.values())  # the fastest at the fleet's median speeds
    assert arm == Arm(0.3, 4)  # of equally fast arms, the a priori cheaper


@pytest.mark.parametrize("bound", [{"round_time_bound": 1.0}, {"round_time_bound": 2.0},
                                   {"round_time_bound_s": 0.5}, {"round_time_bound_s": 20.0}])
def test_never_plays_an_arm_predicted_to_lengthen_the_round_past_the_bound(bound):
    policy = warm(CostUCB(RANKS, RATIOS, **bound))
    rng = np.random.default_rng(0)
    for t in range(4, 40):
        clients = sorted(rng.choice(list(SPEEDS), size=6, replace=False).tolist())
        policy.begin_round(t, clients)
        floor = max(min(policy.times(c)) for c in clients)
        cheap = sorted(min(policy.times(c)) for c in clients)
        median = (cheap[2] + cheap[3]) / 2
        limit = max(floor, bound["round_time_bound_s"] if "round_time_bound_s" in bound
                    else bound["round_time_bound"] * median)
        assert policy.limit() == pytest.approx(limit)
        for c in clients:
            arm = policy.assign(c, t)
            t_arm = policy.predict(c, arm)
            assert t_arm <= limit * (1 + 1e-9) or arm == policy.arms[policy.cheapest(c)]
        policy.observe_round(t, [record(c, Arm(0.3, 8), *SPEEDS[c], loss_drop=0.05) for c in clients])


def test_a_fast_device_plays_a_larger_rank_when_the_round_waits_for_a_slow_one():
    policy = warm(CostUCB(RANKS, RATIOS, round_time_bound=1.0))
    rng = np.random.default_rng(1)
    arms = [Arm(p, r) for p in RATIOS for r in RANKS]
    for t in range(4, 60):  # rank 16 measurably better: its clients' losses fall further
        played = [arms[(c + t) % len(arms)] for c in SPEEDS]
        policy.observe_round(t, [record(c, a, *SPEEDS[c], loss_drop=0.05 * (1.2 if a.rank == 16 else 1.0)
                                        + rng.normal(0, 0.002)) for c, a in zip(SPEEDS, played)])
    fast = max(SPEEDS, key=lambda c: SPEEDS[c][1] * SPEEDS[c][0])
    slow = min(SPEEDS, key=lambda c: SPEEDS[c][1])
    policy.begin_round(60, [fast, slow])
    assert policy.assign(slow, 60).rank == 4
    assert policy.assign(fast, 60).rank == 16


def test_an_arm_that_ran_a_device_out_of_memory_is_not_assigned_to_it_again():
    policy = warm(CostUCB(RANKS, RATIOS))
    policy.observe_round(4, [{**record(2, Arm(0.15, 4), *SPEEDS[2]), K.STATUS: Status.FAILED,
                              K.REASON: "out of memory on jetson-tx2: needs 9 GB"}])
    for t in range(5, 30):
        policy.begin_round(t, [2])
        assert policy.assign(2, t) != Arm(0.15, 4)


def test_state_is_finite_json_and_restores(caplog):
    policy = warm(CostUCB(RANKS, RATIOS))
    bad = record(1, Arm(0.3, 4), *SPEEDS[1])
    bad.update({K.SIM_COMPUTE_S: math.nan, K.TRAIN_LOSS: math.inf, K.PRUNE_RATIO: math.nan})
    policy.observe_round(4, [bad])
    with caplog.at_level("WARNING", logger="fedtune.fleet"):
        policy.update(1, Arm(0.3, 4), math.nan)
    assert any("reward" in r.getMessage() for r in caplog.records)
    text = json.dumps(policy.state_dict(), allow_nan=False)
    other = CostUCB(RANKS, RATIOS)
    other.load_state_dict(json.loads(text))
    for t in range(5, 12):
        policy.begin_round(t, list(range(8)))
        other.begin_round(t, list(range(8)))
        assert [policy.assign(c, t) for c in range(8)] == [other.assign(c, t) for c in range(8)]


def test_beats_s_ucb_in_the_cost_only_simulator_on_a_hidden_heterogeneity_fleet():
    """The measured ordering on FedSpine's 80-device fleet with hidden multipliers and drift, 6 paired seeds."""
    from test_costsim import fedspine_config, minilm_dims

    from fedtune.fleet.costsim import CostSim, registered

    cfg = fedspine_config(["fleet.hidden_compute=[0.5, 1.0]", 'fleet.hidden_compute_draw="choice"',
                           "fleet.hidden_link=[0.25, 4.0]", "fleet.drift_fraction=0.2", "fleet.drift_every=10"])
    sim = CostSim(cfg, minilm_dims())
    seeds = range(6)
    cost = np.array([sim.run(registered(sim, "cost-ucb"), s).time_s for s in seeds])
    sucb = np.array([sim.run(registered(sim, "s-ucb"), s).time_s for s in seeds])
    assert np.exp(np.mean(np.log(sucb / cost))) > 1.1
    assert (cost < sucb).all()


def test_the_fedspine_strategy_tells_cost_ucb_its_round_and_records(task_identity):
    """begin_round gets the round's sampled clients, observe_round the records with their arms; the
    device speeds it learns are the ones the fleet clock charged."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedtune.core.protocol import TrainMetrics
    from fedtune.fleet.clock import FleetSimulator
    from fedtune.lora.records import factors_to_record, state_to_record
    from fedtune.models.loading import cached_base_model
    from fedtune.pruning.structure import model_structure
    from fedtune.training.local import head_state, lora_shapes
    from strategies import FedSpine
    from tests.conftest import FakeGrid, mock_reply

    cfg = config_from_dict({
        "model": {"name": "tiny-bert", "max_length": 32}, "data": {"partitioner": "iid", "eval_size": 32,
                                                                   "max_examples": 200},
        "train": {"local_steps": 40, "batch_size": 4}, "prune": {"interval": 2},
        "federation": {"num_clients": 3, "fraction_train": 1.0, "strategy": "fedspine"},
        "fleet": {"devices": {"raspberry-pi-5": 3}, "simulate_availability": False,
                  "hidden_link": [0.25, 4.0]},
        "policy": {"name": "cost-ucb", "ranks": [2, 4], "ratios": [0.0], "round_time_bound": 1.2}})
    base = cached_base_model(cfg.model, cfg.seed)
    structure = model_structure(base.model)
    fleet = FleetSimulator.from_config(cfg, base.model, structure)
    strat = FedSpine(cfg, structure=structure, fleet=fleet)
    assert isinstance(strat.policy, CostUCB) and strat.policy.bound == 1.2
    state = strat.initial_state(lora_shapes(base, cfg), head_state(base))
    list(strat.configure_train(1, state_to_record(state), ConfigRecord(), FakeGrid(3)))
    assert strat.policy._plan["round"] == 1 and strat.policy._plan["m"] == 3  # begin_round was called
    replies = []
    for c in range(3):
        rank = strat.rank_for(c, 1)
        assert rank == 2  # nothing seen yet: every device starts at the cheapest arm
        payload = strat.client_payload(state, c, rank)
        replies.append(mock_reply(100 + c, RecordDict({
            "arrays": factors_to_record(payload.adapter, payload.head),
            "metrics": MetricRecord(TrainMetrics(num_examples=5, train_loss=0.8, loss_start=1.0, steps=40,
                                                 tokens=40 * 4 * 32).to_record())})))
    strat.aggregate_train(1, replies)
    records = {r["client_id"]: r for r in strat.round_result(1).clients}
    for c in range(3):
        rec = records[c]
        assert rec["sim_seconds"] > 0.04  # the clock records milliseconds: enough to learn from
        assert strat.policy.predict(c, Arm(0.0, 2)) == pytest.approx(rec["sim_seconds"], abs=2e-3)
    assert strat.policy.stats["0|0.0/2"][0] == 3  # each finished client's loss drop entered the arm's utility
    restored = FedSpine(cfg, structure=structure, fleet=fleet)
    restored.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    assert restored.policy.rates == strat.policy.rates
