"""The bandit reward (issue 13, items 9 and 12): each term comparable across devices, and the
reward ranking arms correctly on a synthetic fleet whose costs are known."""

import math

import pytest

from fedtune.core.protocol import ClientKey as K

# A synthetic fleet with known costs: a device does `speed` work units per second; an arm of
# pruning ratio p costs (1 - p) work units (pruning removes FLOPs) and leaves the client's mean
# training loss at rho(p) = 0.85 + 0.2 p of its loss at the round's start (pruning costs quality).
SPEED = {"fast": 4.0, "mid": 1.0, "slow": 0.25}
ARMS = [0.0, 0.3, 0.6]
TARGET = 0.3


def seconds(device, p):
    return (1.0 - p) / SPEED[device]


def rho(p):
    return 0.85 + 0.2 * p


def record(client, device, p, loss_start=2.0):
    """What the server observes of one client-round: outcomes only (no device profile)."""
    t = seconds(device, p)
    return {K.CLIENT_ID: client, K.STATUS: "ok", K.PRUNE_RATIO: p, K.LOSS_START: loss_start,
            K.LOSS_END: rho(p) * loss_start, K.TRAIN_LOSS: rho(p) * loss_start, K.TRAIN_TIME_S: t,
            K.SIM_SECONDS: t, K.SIM_COMPUTE_S: t, K.SIM_COMM_S: 0.0}


def fedspine():
    from fedtune.core.config import config_from_dict
    from strategies.fedspine import FedSpine

    return FedSpine(config_from_dict({"federation": {"strategy": "fedspine"},
                                      "policy": {"name": "s-ucb", "ratios": ARMS, "ranks": [8],
                                                 "target_sparsity": TARGET}}))


def round_rewards(probes):
    """One round: seven mid-range background clients at p = 0.3 (the typical client takes 0.7 s), a
    fast one at p = 0.6 (0.1 s) and the probes ``[(device, p), ...]``, rewarded by the strategy;
    returns the probes' rewards."""
    strat = fedspine()
    records = [record(c, "mid", 0.3, loss_start=1.5 + 0.1 * c) for c in range(7)] + [record(7, "fast", 0.6)]
    records += [record(8 + i, device, p) for i, (device, p) in enumerate(probes)]
    for rec in records:
        strat.arm(rec[K.CLIENT_ID], 1)
    strat.after_round(1, records)
    return [rec[K.REWARD] for rec in records[8:]]


def best_arm(device):
    rewards = {p: round_rewards([(device, p)])[0] for p in ARMS}
    return max(rewards, key=rewards.get), rewards


def test_reward_ranks_arms_by_their_known_costs():
    """The known best arm of each device: the least pruned arm that meets the target sparsity (0.3)
    without lengthening the round (fast and mid devices: 0.3, which beats 0.6 on loss); a slow
    device lengthens the round whatever it plays, so it should play the arm that lengthens it least
    (0.6: 1.6 s instead of 2.8 s for a round whose typical client takes 0.7 s)."""
    assert best_arm("fast")[0] == 0.3, best_arm("fast")
    assert best_arm("mid")[0] == 0.3, best_arm("mid")
    assert best_arm("slow")[0] == 0.6, best_arm("slow")


def test_reward_terms_are_comparable_across_devices():
    """Same arm, same loss outcome, neither lengthens the round: the same reward, whatever the device's
    speed; a device's speed only costs it where it makes the round longer."""
    fast, mid = round_rewards([("fast", 0.3), ("mid", 0.3)])
    assert fast == pytest.approx(mid)
    (slow,) = round_rewards([("slow", 0.3)])
    assert slow < mid


def test_reward_formula_hand_computed():
    from fedtune.fleet.rewards import fedspine_reward

    # loss ratio 0.9 against a round median of 0.95: q = 0.5 + (0.95 - 0.9) / (2 * 0.2) = 0.625;
    # half the target reached: 0.5; twice the round's typical time: 0.5
    r = fedspine_reward(loss_ratio=0.9, median_loss_ratio=0.95, reached=0.15, target=0.3, seconds=2.0,
                        makespan_s=1.0)
    assert r == pytest.approx(0.3 * 0.625 + 0.2 * 0.5 + 0.5 * 0.5)
    assert fedspine_reward(loss_ratio=0.9, median_loss_ratio=0.95, reached=0.3, target=0.3, seconds=1.0,
                           makespan_s=1.0, failed=True) == 0.0
    # no pruning target: progress 1; faster than the typical client: no time cost; loss far worse: 0
    assert fedspine_reward(loss_ratio=2.0, median_loss_ratio=0.9, reached=0.0, target=0.0, seconds=0.5,
                           makespan_s=1.0) == pytest.approx(0.2 + 0.5)


def test_round_rewards_from_outcomes():
    from fedtune.fleet.rewards import Outcome, round_rewards

    outs = [Outcome(ok=True, seconds=1.0, loss_start=2.0, train_loss=1.8, reached=0.3),
            Outcome(ok=True, seconds=3.0, loss_start=1.0, train_loss=0.9, reached=0.3),
            Outcome(ok=True, seconds=1.0, loss_start=1.0, train_loss=0.9, reached=0.3),
            Outcome(ok=False)]
    r = round_rewards(outs, target=0.3)
    assert r[3] == 0.0
    assert r[0] == pytest.approx(r[2]) == pytest.approx(0.3 * 0.5 + 0.2 + 0.5)  # the data's scale cancels
    assert r[1] == pytest.approx(0.3 * 0.5 + 0.2 + 0.5 / 3)


@pytest.mark.parametrize("bad", [{"seconds": math.nan}, {"loss_start": math.nan}, {"train_loss": math.inf},
                                 {"seconds": 0.0}])
def test_unknown_inputs_give_a_non_finite_reward(bad):
    """Item 12: the reward of a client whose time or loss is unknown is NaN (the caller skips it),
    never a made-up number."""
    from fedtune.fleet.rewards import Outcome, round_rewards

    good = {"ok": True, "seconds": 1.0, "loss_start": 2.0, "train_loss": 1.8, "reached": 0.3}
    r = round_rewards([Outcome(**good), Outcome(**{**good, **bad})], target=0.3)
    assert math.isfinite(r[0]) and not math.isfinite(r[1])


def test_outcome_from_record_prefers_simulated_seconds():
    from fedtune.fleet.rewards import Outcome

    rec = record(0, "mid", 0.3)
    rec[K.TRAIN_TIME_S] = 99.0
    assert Outcome.from_record(rec).seconds == pytest.approx(0.7)
    del rec[K.SIM_SECONDS]
    assert Outcome.from_record(rec).seconds == 99.0
    assert Outcome.from_record({K.CLIENT_ID: 1, K.STATUS: "failed"}).ok is False
