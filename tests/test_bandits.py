"""Every bandit policy on synthetic problems with known best arms."""

import json
import math
import random

import pytest

from fedtune.fleet.policies import (
    EUCB,
    POLICIES,
    SUCB,
    Arm,
    Policy,
    Speed,
    StaticPolicy,
    arm_grid,
    make_policy,
)

RATIOS, RANKS = [0.1, 0.3, 0.5], [4, 8]


def discrete_mean(best):
    def mean(arm):
        return 0.8 if arm == best else 0.35 + 0.1 * RANKS.index(arm.rank) + 0.1 * RATIOS.index(arm.ratio) / 2
    return mean


def smooth_mean(best_ratio, best_rank):
    def mean(arm):
        return (0.9 if arm.rank == best_rank else 0.6) - 3.0 * (arm.ratio - best_ratio) ** 2
    return mean


def play(policy, mean, pulls, rng, client=0, start=0):
    chosen = []
    for t in range(start, start + pulls):
        arm = policy.assign(client, t)
        reward = min(1.0, max(0.0, mean(arm) + rng.gauss(0, 0.05)))
        policy.update(client, arm, reward)
        chosen.append(arm)
    return chosen


def tail_share(chosen, ok):
    tail = chosen[-len(chosen) // 5:]
    return sum(ok(a) for a in tail) / len(tail)


DISCRETE = ["epsilon-greedy", "discounted-ucb", "sliding-window-ucb", "thompson"]


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_policies_find_the_best_arm(name):
    best = Arm(0.3, 8)
    policy = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=1)
    chosen = play(policy, discrete_mean(best), 400, random.Random(0))
    assert tail_share(chosen, lambda a: a == best) >= 0.8


@pytest.mark.parametrize("name, pulls", [("ucb1", 400), ("exp3", 1500)])
def test_ucb1_and_exp3_prefer_the_best_arm(name, pulls):
    """UCB1 (c = sqrt 2) and EXP3 explore more by design: the best arm is the most pulled."""
    best = Arm(0.3, 8)
    policy = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=1)
    chosen = play(policy, discrete_mean(best), pulls, random.Random(0))
    tail = chosen[-pulls // 5:]
    assert max(set(tail), key=tail.count) == best


@pytest.mark.parametrize("name", ["discounted-ucb", "sliding-window-ucb"])
def test_discounted_policies_recover_when_the_best_arm_changes(name):
    policy = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=2)
    rng = random.Random(0)
    play(policy, discrete_mean(Arm(0.3, 8)), 300, rng)
    new_best = Arm(0.5, 4)
    chosen = play(policy, discrete_mean(new_best), 300, rng, start=300)
    assert tail_share(chosen, lambda a: a == new_best) >= 0.8


GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


@pytest.mark.parametrize("cls", [SUCB, EUCB])
def test_adaptive_partition_policies_find_the_best_region(cls):
    policy = cls(RANKS, [0.0, 0.3, 0.6], pool="none", refine=True, seed=3)
    chosen = play(policy, smooth_mean(0.45, 8), 500, random.Random(0))
    tail = chosen[-100:]
    assert tail_share(chosen, lambda a: a.rank == 8 and 0.3 <= a.ratio <= 0.6) >= 0.8
    top = max(set(tail), key=tail.count)
    assert top.rank == 8 and 0.35 <= top.ratio <= 0.55, top
    cells = policy.learners[0]["cells"]
    assert len(cells) > len(RANKS)  # the ratio axis was split where it was pulled


def test_sucb_recovers_when_the_optimum_moves():
    policy = SUCB(RANKS, [0.0, 0.15, 0.3, 0.45, 0.6], pool="none", seed=4)
    rng = random.Random(1)
    play(policy, smooth_mean(0.45, 8), 400, rng)
    chosen = play(policy, smooth_mean(0.15, 4), 400, rng, start=400)
    assert tail_share(chosen, lambda a: a.rank == 4 and a.ratio <= 0.3) >= 0.8
    tail = chosen[-80:]
    assert max(set(tail), key=tail.count) == Arm(0.15, 4)


def fleet_play(policy, rounds, rng):
    """60 clients, 8 sampled a round: slow ones (4x slower) are best at (0.5, 4), fast ones at
    (0.1, 16); each is seen ~5 times in 40 rounds. Returns the near-best share of the last fifth."""
    best = {"slow": (0.5, 4), "fast": (0.1, 16)}
    kind = {c: "slow" if c % 2 else "fast" for c in range(60)}
    chosen = []
    for t in range(rounds):
        clients = rng.sample(range(60), 8)
        times = {c: (4.0 if kind[c] == "slow" else 1.0) * rng.uniform(0.9, 1.1) for c in clients}
        for c in clients:
            arm = policy.assign(c, t)
            ratio, rank = best[kind[c]]
            mean = (0.9 if arm.rank == rank else 0.6) - 3.0 * (arm.ratio - ratio) ** 2
            policy.update(c, arm, min(1.0, max(0.0, mean + rng.gauss(0, 0.1))))
            if t >= rounds * 4 // 5:
                chosen.append(mean >= 0.85)  # within 0.05 of the best arm's mean
        policy.observe({c: Speed(seconds=times[c]) for c in clients})
    return sum(chosen) / len(chosen)


def test_sucb_pools_clients_by_observed_speed():
    """With few pulls per client, speed-tier pooling learns each tier's arm; per-client learners cannot."""
    pooled = fleet_play(SUCB([4, 8, 16], GRID, seed=5), 40, random.Random(2))
    alone = fleet_play(SUCB([4, 8, 16], GRID, pool="none", seed=5), 40, random.Random(2))
    assert pooled >= 0.8 and pooled > alone + 0.2, (pooled, alone)


def test_sucb_speed_tiers_survive_a_restore():
    policy = SUCB(RANKS, RATIOS, seed=6)
    assert policy.key(3) == "new"
    # the first round's median (2 s) is the reference: 4x slower is tier +2, 2x faster tier -1
    policy.observe({3: Speed(seconds=8.0), 4: Speed(seconds=1.0), 5: Speed(seconds=2.0)})
    assert (policy.key(3), policy.key(4), policy.key(5)) == ("tier+2", "tier-1", "tier+0")
    policy.update(3, policy.assign(3, 0), 0.5)
    clone = SUCB(RANKS, RATIOS, seed=0)
    clone.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert clone.key(3) == "tier+2" and clone.learners.keys() == policy.learners.keys()
    assert clone.assign(3, 1) == policy.assign(3, 1)
    with pytest.raises(ValueError, match="pool"):
        SUCB(RANKS, RATIOS, pool="class")


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"static"}))
def test_policies_are_deterministic_for_a_seed_and_restore_their_state(name):
    def run(policy, n, start=0):
        return play(policy, smooth_mean(0.3, 8) if name in ("s-ucb", "e-ucb") else discrete_mean(Arm(0.3, 8)),
                    n, random.Random(start), client=5, start=start)

    a = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=9)
    b = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=9)
    assert isinstance(a, Policy)
    assert run(a, 50) == run(b, 50)
    state = json.loads(json.dumps(a.state_dict()))  # saved with the run as JSON
    c = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=123)
    c.load_state_dict(state)
    assert run(a, 30, start=50) == run(c, 30, start=50)


def test_static_policy_by_device_class():
    policy = StaticPolicy({"tx2": Arm(0.5, 4), "agx": Arm(0.1, 16)}, {0: "tx2", 1: "agx"})
    assert policy.assign(0, 1) == Arm(0.5, 4) and policy.assign(1, 7) == Arm(0.1, 16)
    with pytest.raises(KeyError, match="client 2"):
        policy.assign(2, 1)
    assert len(arm_grid(RATIOS, RANKS)) == 6


def test_user_policy_plugs_in_from_a_file(tmp_path):
    from fedtune.core.config import ConfigError, config_from_dict
    from strategies.fedspine import FedSpine, build_policy

    f = tmp_path / "my_policy.py"
    f.write_text(
        "from fedtune.fleet.policies import Arm\n"
        "class Fixed:\n"
        "    def __init__(self, ratios, ranks, seed=0):\n"
        "        self.arm = Arm(max(ratios), min(ranks))\n"
        "    def assign(self, client_id, server_round):\n        return self.arm\n"
        "    def update(self, client_id, arm, reward):\n        pass\n"
        "    def state_dict(self):\n        return {}\n"
        "    def load_state_dict(self, state):\n        pass\n"
        "class Broken:\n"
        "    def __init__(self, ratios, ranks, seed=0):\n        pass\n"
    )
    cfg = config_from_dict({"federation": {"strategy": "fedspine"},
                            "policy": {"name": f"{f}:Fixed", "ratios": [0.0, 0.4], "ranks": [4, 8]}})
    strat = FedSpine(cfg)
    assert strat.rank_for(3, 1) == 4 and strat.prune_ratio_for(3, 1) == 0.4
    with pytest.raises(ConfigError, match="lacks assign/update"):
        build_policy(config_from_dict({"policy": {"name": f"{f}:Broken"}}))
    with pytest.raises(ConfigError, match="policy.name: unknown policy 'ucb9'"):
        build_policy(config_from_dict({"policy": {"name": "ucb9"}}))


def test_fedspine_static_arms_by_device_class_and_step_mode():
    from fedtune.core.config import ConfigError, config_from_dict
    from strategies.fedspine import FedSpine

    base = {"federation": {"strategy": "fedspine", "num_clients": 3},
            "fleet": {"devices": {"jetson-tx2": 2, "jetson-agx-xavier": 1}},
            "policy": {"name": "static", "ratio_mode": "step", "target_sparsity": 0.3,
                       "args": {"arms": {"jetson-tx2": [0.2, 4], "jetson-agx-xavier": [0.1, 16]}}}}
    strat = FedSpine(config_from_dict(base))
    assert (strat.rank_for(0, 1), strat.prune_ratio_for(0, 1)) == (4, 0.2)
    assert (strat.rank_for(2, 1), strat.prune_ratio_for(2, 1)) == (16, 0.1)
    strat.sparsity[0] = 0.2  # step mode: 0.2 reached + 0.2 step, capped at the 0.3 target
    assert strat.prune_ratio_for(0, 2) == pytest.approx(0.3)
    base["policy"]["args"] = {"arms": {"jetson-tx2": [0.2, 4]}}
    with pytest.raises(ConfigError, match="no arm for device class 'jetson-agx-xavier'"):
        FedSpine(config_from_dict(base))


def test_clients_sharing_a_learner_in_one_round_get_different_arms():
    """Batched UCB: the 8 new clients of a round share S-UCB's 'new' learner; pending pulls spread
    them over its untried cells instead of giving all eight the same arm."""
    policy = SUCB([4, 8, 16], [0.0, 0.6], seed=7)
    arms = [policy.assign(c, 1) for c in range(8)]
    assert len(set(arms)) == 6  # 3 ranks x 2 ratios, each tried before any is repeated
    for c, arm in enumerate(arms):
        policy.update(c, arm, 0.5)
    again = [policy.assign(c, 2) for c in range(8, 16)]
    assert len(set(again)) > 1


# ---------------------------------------------------------------- issue 13: items 5, 6, 7, 12


def test_sucb_plays_the_configured_ratios():
    """Item 5: the configured ratios are the arms S-UCB plays (not cell midpoints such as 0.1875)."""
    policy = make_policy("s-ucb", ratios=[0.15, 0.3], ranks=[4, 8], seed=1, pool="none")
    played = play(policy, smooth_mean(0.3, 8), 60, random.Random(0))
    assert {a.ratio for a in played} == {0.15, 0.3}
    assert {a.rank for a in played} == {4, 8}


@pytest.mark.parametrize("name, kwargs", [("s-ucb", {"refine": True}), ("e-ucb", {})])
def test_adaptive_refinement_splits_the_configured_grid(name, kwargs):
    """Item 5: with refinement (S-UCB's option, E-UCB's definition) pulled cells of the 0.15/0.3 grid
    split, new ratios between the configured ones get played, and the configured ones stay playable."""
    policy = make_policy(name, ratios=[0.15, 0.3], ranks=[4], seed=2, pool="none", **kwargs)
    played = play(policy, smooth_mean(0.25, 4), 200, random.Random(1))
    ratios = {a.ratio for a in played}
    assert {0.15, 0.3} <= ratios
    assert any(0.15 < r < 0.3 for r in ratios), ratios
    assert len(policy.learners[0]["cells"]) > 2


def test_sucb_discounts_once_per_round_not_per_update():
    """Item 6: a pooled learner updated 8 times in one round is not decayed within the round; it decays
    by gamma ** (rounds elapsed) when the round advances."""
    policy = SUCB([4], [0.0, 0.6], gamma=0.5, seed=3)  # every new client shares the "new" learner
    arms = {c: policy.assign(c, 1) for c in range(8)}
    for c, arm in arms.items():
        policy.update(c, arm, 1.0)
    cells = policy.learners["new"]["cells"]
    assert sum(c[3] for c in cells) == pytest.approx(8.0)
    assert sum(c[4] for c in cells) == pytest.approx(8.0)
    policy.assign(100, 3)  # two rounds later
    assert sum(c[3] for c in policy.learners["new"]["cells"]) == pytest.approx(8.0 * 0.5 ** 2)


def _fedspine(policy="s-ucb", **args):
    from fedtune.core.config import config_from_dict
    from strategies.fedspine import FedSpine

    return FedSpine(config_from_dict({"federation": {"strategy": "fedspine"},
                                      "policy": {"name": policy, "ratios": [0.0, 0.3, 0.6], "ranks": [4, 8],
                                                 "target_sparsity": 0.3, "args": args}}))


def _record(client, *, flops, flop_rate, comm_bytes=1e6, byte_rate=1e6, loss_start=2.0, train_loss=1.8,
            reached=0.3):
    from fedtune.core.protocol import ClientKey as K

    compute_s, comm_s = flops / flop_rate, comm_bytes / byte_rate
    return {K.CLIENT_ID: client, K.STATUS: "ok", K.PRUNE_RATIO: reached, K.LOSS_START: loss_start,
            K.LOSS_END: train_loss, K.TRAIN_LOSS: train_loss, K.TRAIN_TIME_S: 0.5,
            K.SIM_SECONDS: compute_s + comm_s, K.SIM_COMPUTE_S: compute_s, K.SIM_COMM_S: comm_s,
            K.FLOPS: flops, K.COMM_BYTES: comm_bytes}


def test_speed_tiers_come_from_arm_normalised_speed():
    """Item 7: a slow device given a cheap arm finishes sooner than a fast device given an expensive
    one; its tier must still be the slower one (FLOP/s and bytes/s, not raw seconds)."""
    strat = _fedspine()
    records = [_record(0, flops=1e9, flop_rate=1e9),  # slow device, cheap arm: 2 s
               _record(1, flops=16e9, flop_rate=4e9),  # fast device, expensive arm: 5 s
               _record(2, flops=4e9, flop_rate=2e9)]  # a middle one: 3 s
    for rec in records:
        strat.arm(rec["client_id"], 1)
    strat.after_round(1, records)
    tiers = {c: int(strat.policy.key(c)[4:]) for c in range(3)}
    assert tiers[0] > tiers[2] > tiers[1], tiers
    # the tier follows the device, whatever arm it plays next
    strat.after_round(2, [_record(0, flops=8e9, flop_rate=1e9), _record(1, flops=1e9, flop_rate=4e9)])
    assert strat.policy.key(0) == f"tier{tiers[0]:+d}" and strat.policy.key(1) == f"tier{tiers[1]:+d}"


def test_speed_tiers_fall_back_to_seconds_without_cost_fields():
    """Item 7, a real deployment: no FLOPs or bytes in the records, the tier comes from train seconds."""
    from fedtune.core.protocol import ClientKey as K

    strat = _fedspine()
    records = [{K.CLIENT_ID: c, K.STATUS: "ok", K.PRUNE_RATIO: 0.3, K.LOSS_START: 2.0, K.LOSS_END: 1.8,
                K.TRAIN_LOSS: 1.8, K.TRAIN_TIME_S: t} for c, t in ((0, 8.0), (1, 2.0), (2, 2.0))]
    strat.after_round(1, records)
    assert (strat.policy.key(0), strat.policy.key(1)) == ("tier+2", "tier+0")


def test_custom_policy_without_observe_still_works(tmp_path):
    from fedtune.core.config import config_from_dict
    from strategies.fedspine import FedSpine

    f = tmp_path / "plain.py"
    f.write_text(
        "from fedtune.fleet.policies import Arm\n"
        "class Plain:\n"
        "    def __init__(self, ratios, ranks, seed=0):\n        self.seen = []\n"
        "    def assign(self, client_id, server_round):\n        return Arm(0.3, 4)\n"
        "    def update(self, client_id, arm, reward):\n        self.seen.append(reward)\n"
        "    def state_dict(self):\n        return {}\n"
        "    def load_state_dict(self, state):\n        pass\n")
    strat = FedSpine(config_from_dict({"federation": {"strategy": "fedspine"}, "policy": {"name": f"{f}:Plain"}}))
    strat.arm(0, 1)
    strat.after_round(1, [_record(0, flops=1e9, flop_rate=1e9)])
    assert len(strat.policy.seen) == 1 and 0.0 <= strat.policy.seen[0] <= 1.0


def _assert_finite_json(state):
    text = json.dumps(state, allow_nan=False)  # raises on NaN / inf
    assert json.loads(text) == json.loads(json.dumps(state))


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"static", "cost-ucb"}))  # cost-ucb: test_cost_bandit.py
def test_non_finite_rewards_never_enter_a_policy(name, caplog):
    """Item 12: a NaN or infinite reward is skipped with a log line; the state stays finite JSON."""
    policy = make_policy(name, ratios=RATIOS, ranks=RANKS, seed=4)
    before = json.dumps(policy.state_dict())
    with caplog.at_level("WARNING", logger="fedtune.fleet"):
        for bad in (float("nan"), float("inf")):
            policy.update(0, policy.assign(0, 1), bad)
    assert any(r.name.startswith("fedtune.fleet") and "reward" in r.getMessage() for r in caplog.records)
    _assert_finite_json(policy.state_dict())
    policy.update(0, policy.assign(0, 2), 0.5)
    _assert_finite_json(policy.state_dict())
    assert json.dumps(policy.state_dict()) != before


def test_missing_train_time_never_puts_nan_into_the_sucb_checkpoint(caplog):
    """Item 12: a client without sim or train seconds gets no reward (logged); the checkpoint is finite."""
    from fedtune.core.protocol import ClientKey as K

    strat = _fedspine()
    records = [{K.CLIENT_ID: c, K.STATUS: "ok", K.PRUNE_RATIO: 0.3, K.LOSS_START: 2.0, K.LOSS_END: 1.8,
                K.TRAIN_LOSS: 1.8, K.TRAIN_TIME_S: float("nan")} for c in range(3)]
    for rec in records:
        strat.arm(rec[K.CLIENT_ID], 1)
    with caplog.at_level("WARNING", logger="fedtune.fleet"):
        strat.after_round(1, records)
    assert any(r.name.startswith("fedtune.fleet") for r in caplog.records)
    assert all(K.REWARD not in rec or math.isfinite(rec[K.REWARD]) for rec in records)
    _assert_finite_json(strat.state_dict())
    clone = _fedspine()
    clone.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    assert clone.policy.state_dict() == strat.policy.state_dict()
