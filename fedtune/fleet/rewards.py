"""The bandit reward of one client-round (FedSpine's, reconstructed; arXiv 2501.02438).

FedSpine rewards an arm by the loss it bought, the pruning it achieved and how long the
client took relative to the others; its exact formula is not public. fedtune uses, for a
client that finished the round::

    r = w_loss * clip((L_prev - L_now) / L_prev, 0, 1)          relative loss improvement
      + w_prune * min(reached / target, 1)   (1 when target = 0) progress toward the target sparsity
      + w_time * t_fastest / t_client                            1 for the round's fastest client

with ``w = (0.4, 0.3, 0.3)`` by default, so ``r`` is in [0, 1]. An out-of-memory failure or
a missed deadline scores 0. All inputs are observed outcomes; device profiles never enter.
"""

from __future__ import annotations

import math

__all__ = ["fedspine_reward"]


def fedspine_reward(*, loss_prev: float, loss_now: float, reached: float, target: float, seconds: float,
                    fastest_seconds: float, failed: bool = False,
                    weights: tuple[float, float, float] = (0.4, 0.3, 0.3)) -> float:
    """Reward in [0, 1] of one client-round (module docstring for the formula)."""
    if failed or not math.isfinite(loss_now) or seconds <= 0:
        return 0.0
    w_loss, w_prune, w_time = weights
    if loss_prev > 0 and math.isfinite(loss_prev):
        improvement = min(max((loss_prev - loss_now) / loss_prev, 0.0), 1.0)
    else:
        improvement = 0.0
    progress = 1.0 if target <= 0 else min(max(reached / target, 0.0), 1.0)
    speed = min(max(fastest_seconds / seconds, 0.0), 1.0)
    total = w_loss + w_prune + w_time
    return (w_loss * improvement + w_prune * progress + w_time * speed) / total
