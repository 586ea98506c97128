"""The bandit reward of one client-round (FedSpine's, reconstructed; arXiv 2501.02438).

FedSpine rewards an arm by the loss it bought, the pruning it achieved and how long the
client took; its exact formula is not public. fedtune rewards a client ``k`` that finished
round ``t`` by three terms, each in [0, 1] and each measuring what the *arm* did, so that a
reward means the same on a fast and on a slow device::

    rho_k = L_mean,k / L_start,k                              the client's loss over the round, relative
                                                              to its own loss at the round's start
    q_k   = clip(1/2 + (median_j rho_j - rho_k) / (2 s), 0, 1)      quality, against the round's clients
    p_k   = min(reached_k / target, 1)      (1 when target = 0)    progress toward the target sparsity
    c_k   = min(1, T / t_k),   T = median_j t_j                    the round-time cost of the arm

    r_k   = w_q q_k + w_p p_k + w_c c_k,   w = (0.3, 0.2, 0.5),  s = 0.2

- ``L_mean`` is the client's mean training loss over *all* its local steps (every example it
  trained on this round) and ``L_start`` the mean of the first quarter of them; the ratio
  removes the client's data difficulty (a client with hard data is not penalised), and the
  median over the round's finished clients ``j`` removes what every client shares (the global
  model's progress), so only the arm's effect remains: a client whose loss fell ``s`` (20
  points of its start loss) further than the round's median client's scores 1, as much less 0.
  Device speed does not enter.
- ``t_k`` is the client-round's completion seconds (simulated when the fleet is simulated,
  else the client's wall seconds) and ``T`` the round's median over its finished clients:
  the makespan the round would have if nobody were slower than its typical client. A client
  that finishes within ``T`` costs the round nothing (``c = 1``) whatever its device, so a
  fast device is not rewarded for a cheap arm it does not need; a straggler scores ``T / t``,
  the share of its time the typical client is not waiting for it, so its cheaper arms score
  more. (A client past ``fleet.deadline_s`` is dropped and scores 0, below.)
- the weights sum to 1, so ``r`` is in [0, 1]; an out-of-memory failure, a crash or a missed
  deadline scores 0.

All inputs are observed outcomes; device profiles never enter. A client whose seconds or
losses are missing or not finite gets a NaN reward: the caller skips it (logged), so a made-up
number never enters a policy's statistics.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from fedtune.core.protocol import ClientKey, Status

__all__ = ["LOSS_SCALE", "WEIGHTS", "Outcome", "fedspine_reward", "round_rewards"]

WEIGHTS = (0.3, 0.2, 0.5)  # (quality, pruning progress, round-time cost)
LOSS_SCALE = 0.2  # s: the loss-ratio lead over the round's median client that scores 1


@dataclass(frozen=True)
class Outcome:
    """What the reward sees of one client-round: observed outcomes only."""

    ok: bool  # finished and accepted (not failed, rejected or dropped)
    seconds: float = math.nan  # completion seconds: simulated when present, else wall train seconds
    loss_start: float = math.nan  # mean loss of the first quarter of its local steps
    train_loss: float = math.nan  # mean loss over all its local steps
    reached: float = 0.0  # sparsity reached at the round's end

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Outcome:
        if rec.get(ClientKey.STATUS) != Status.OK:
            return cls(ok=False)
        seconds = rec.get(ClientKey.SIM_SECONDS, rec.get(ClientKey.TRAIN_TIME_S))
        return cls(ok=True, seconds=_float(seconds), loss_start=_float(rec.get(ClientKey.LOSS_START)),
                   train_loss=_float(rec.get(ClientKey.TRAIN_LOSS)), reached=_float(rec.get(ClientKey.PRUNE_RATIO, 0.0)))

    @property
    def loss_ratio(self) -> float:
        if self.loss_start > 0 and math.isfinite(self.loss_start) and math.isfinite(self.train_loss):
            return self.train_loss / self.loss_start
        return math.nan


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _clip(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def fedspine_reward(*, loss_ratio: float, median_loss_ratio: float, reached: float, target: float, seconds: float,
                    makespan_s: float, failed: bool = False, weights: tuple[float, float, float] = WEIGHTS,
                    loss_scale: float = LOSS_SCALE) -> float:
    """Reward in [0, 1] of one client-round given its round's medians (module docstring); NaN when
    an input it needs is unknown (non-finite, or a non-positive time)."""
    if failed:
        return 0.0
    if not all(math.isfinite(x) for x in (loss_ratio, median_loss_ratio, seconds, makespan_s, reached)) \
            or seconds <= 0 or makespan_s <= 0:
        return math.nan
    w_q, w_p, w_c = weights
    quality = _clip(0.5 + (median_loss_ratio - loss_ratio) / (2 * loss_scale))
    progress = 1.0 if target <= 0 else _clip(reached / target)
    cost = min(1.0, makespan_s / seconds)
    return (w_q * quality + w_p * progress + w_c * cost) / (w_q + w_p + w_c)


def round_rewards(outcomes: list[Outcome], *, target: float, weights: tuple[float, float, float] = WEIGHTS,
                  loss_scale: float = LOSS_SCALE) -> list[float]:
    """The reward of every client-round of one round, in order: 0 for a failure, NaN where an input
    is unknown. The round's medians are over its finished clients with finite values."""
    ratios = [o.loss_ratio for o in outcomes if o.ok and math.isfinite(o.loss_ratio)]
    times = [o.seconds for o in outcomes if o.ok and math.isfinite(o.seconds) and o.seconds > 0]
    median_ratio = statistics.median(ratios) if ratios else math.nan
    makespan = statistics.median(times) if times else math.nan
    return [fedspine_reward(loss_ratio=o.loss_ratio, median_loss_ratio=median_ratio, reached=o.reached, target=target,
                            seconds=o.seconds, makespan_s=makespan, failed=not o.ok, weights=weights,
                            loss_scale=loss_scale)
            for o in outcomes]
