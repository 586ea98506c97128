"""Every bandit policy on synthetic problems with known best arms."""

import json
import random

import pytest

from fedtune.fleet.policies import (
    EUCB,
    POLICIES,
    SUCB,
    Arm,
    Policy,
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


@pytest.mark.parametrize("cls", [SUCB, EUCB])
def test_adaptive_partition_policies_find_the_best_region(cls):
    policy = cls(RANKS, (0.0, 0.6), pool="none", seed=3)
    chosen = play(policy, smooth_mean(0.45, 8), 500, random.Random(0))
    assert tail_share(chosen, lambda a: a.rank == 8 and 0.35 <= a.ratio <= 0.55) >= 0.8
    cells = policy.learners[0]["cells"]
    assert len(cells) > len(RANKS)  # the ratio axis was split where it was pulled


def test_sucb_recovers_when_the_optimum_moves():
    policy = SUCB(RANKS, (0.0, 0.6), pool="none", seed=4)
    rng = random.Random(1)
    play(policy, smooth_mean(0.45, 8), 400, rng)
    chosen = play(policy, smooth_mean(0.15, 4), 400, rng, start=400)
    assert tail_share(chosen, lambda a: a.rank == 4 and 0.05 <= a.ratio <= 0.25) >= 0.8


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
        median = sorted(times.values())[len(times) // 2]
        for c in clients:
            policy.observe(c, times[c], median)
    return sum(chosen) / len(chosen)


def test_sucb_pools_clients_by_observed_speed():
    """With few pulls per client, speed-tier pooling learns each tier's arm; per-client learners cannot."""
    pooled = fleet_play(SUCB([4, 8, 16], (0.0, 0.6), seed=5), 40, random.Random(2))
    alone = fleet_play(SUCB([4, 8, 16], (0.0, 0.6), pool="none", seed=5), 40, random.Random(2))
    assert pooled >= 0.8 and pooled > alone + 0.2, (pooled, alone)


def test_sucb_speed_tiers_survive_a_restore():
    policy = SUCB(RANKS, (0.0, 0.6), seed=6)
    assert policy.key(3) == "new"
    policy.observe(3, 8.0, 2.0)  # the first median is the reference: 4x slower is tier +2
    policy.observe(4, 1.0, 4.0)
    assert (policy.key(3), policy.key(4)) == ("tier+2", "tier-1")
    policy.update(3, policy.assign(3, 0), 0.5)
    clone = SUCB(RANKS, (0.0, 0.6), seed=0)
    clone.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert clone.key(3) == "tier+2" and clone.learners.keys() == policy.learners.keys()
    assert clone.assign(3, 1) == policy.assign(3, 1)
    with pytest.raises(ValueError, match="pool"):
        SUCB(RANKS, (0.0, 0.6), pool="class")


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


def test_fedspine_reward_hand_computed():
    from fedtune.fleet.rewards import fedspine_reward

    r = fedspine_reward(loss_prev=1.0, loss_now=0.8, reached=0.2, target=0.4, seconds=20.0, fastest_seconds=10.0)
    assert r == pytest.approx(0.4 * 0.2 + 0.3 * 0.5 + 0.3 * 0.5)
    assert fedspine_reward(loss_prev=1.0, loss_now=0.5, reached=0.4, target=0.4, seconds=5.0, fastest_seconds=5.0,
                           failed=True) == 0.0
    assert fedspine_reward(loss_prev=1.0, loss_now=1.2, reached=0.0, target=0.0, seconds=5.0,
                           fastest_seconds=5.0) == pytest.approx(0.6)


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
    policy = SUCB([4, 8, 16], (0.0, 0.6), seed=7)
    arms = [policy.assign(c, 1) for c in range(8)]
    assert len(set(arms)) == 6  # 3 ranks x 2 initial cells, each tried before any is repeated
    for c, arm in enumerate(arms):
        policy.update(c, arm, 0.5)
    again = [policy.assign(c, 2) for c in range(8, 16)]
    assert len(set(again)) > 1
