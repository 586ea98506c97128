"""Bandit policies that choose each client's (pruning ratio, LoRA rank) every round.

FedSpine (arXiv 2501.02438) learns, per device and from observed outcomes only, which
pruning ratio and LoRA rank to assign; its S-UCB formula is not public, so
:class:`SUCB` here is a documented reconstruction:

- an arm is ``(ratio, rank)``: the configured ratios (``policy.ratios``) x ranks, each played
  exactly as configured. Each ratio is the *point* of a cell of the ratio axis whose edges lie
  halfway to its neighbours. With ``refine=True`` (S-UCB's option; always on for FedMP's E-UCB,
  Jiang et al. 2022) the axis is partitioned adaptively: a cell pulled ``split_after`` times and
  at least ``2 * min_width`` wide splits at its middle; the half holding its point keeps the
  point and its statistics (every pull was there), the other half gets its own midpoint as a
  new, untried arm, so the search refines where it is pulled and configured ratios stay playable;
- statistics are discounted by ``gamma`` once per *round* (rewards drift as training
  converges): when a learner is next used in round ``t`` after its last decay in round ``t0``,
  ``N_c <- gamma^(t - t0) N_c`` and ``S_c <- gamma^(t - t0) S_c``; the pulls of one round
  (many, for a pooled learner) are not discounted against each other;
- a client picks the cell maximising ``S_c / N_c + c_explore * sqrt(log(sum N) / N_c)``
  (unpulled cells first, in a seeded order) and plays the cell's point;
- within a round, assignments not yet rewarded count as pulls at the cell's mean (batched UCB),
  so the clients of one round that share a learner do not all get the same arm;
- ``pool = "speed"`` (S-UCB's default here): FedSpine runs a learner per device, which needs
  many pulls per device; with 80 devices and a tenth sampled per round a device is seen a few
  times in a whole run. So clients share one learner per *speed tier*, learned from outcomes
  only and normalised by the arm: after every round the strategy reports each finished
  client's :class:`Speed` (:meth:`AdaptiveUCB.observe`). On a simulated fleet that is the
  device's FLOP/s (``flops / sim_compute_s``) and bytes/s (``comm_bytes / sim_comm_s``), and a
  client's *device seconds* are the time it would take on a reference workload (the first
  such round's median FLOPs and bytes), whatever arm it played. On a real deployment, where
  records carry no FLOPs or bytes, the device seconds fall back to the client's raw seconds,
  which mix the device's speed with the arm's cost. The first round's median device seconds
  is the reference; a client's tier is the octave of the EMA of ``log2(device seconds /
  reference)`` (clients within 2x of each other share statistics); a client never observed
  yet uses the ``new`` learner. ``pool = "none"`` is one learner per client.

Every policy implements the :class:`Policy` protocol and keeps one independent learner
per client, seeded from ``(seed, client_id)``, so a run is reproducible. Rewards are in
[0, 1]; see :mod:`fedtune.fleet.rewards`. A non-finite reward is skipped with a warning on the
``fedtune.fleet`` logger and never stored, so a policy's state stays finite, JSON-serialisable
and restorable. Baselines: static by device class, random, epsilon-greedy, UCB1, discounted
UCB (discounted per update of the client's own learner), sliding-window UCB, EXP3, Thompson
sampling (Gaussian), and FedMP's E-UCB (adaptive partitioning, no discounting).

Beside S-UCB, :class:`CostUCB` (``cost-ucb``) is cost-aware: it learns each device's FLOP/s and
bytes/s from the seconds the device reports, predicts every arm's seconds, never plays an arm
predicted to lengthen the round past a bound set in ``[policy]`` (``round_time_bound``,
``round_time_bound_s``), and runs UCB over the rest on the round's training-loss drop per
second. It uses two optional hooks the fedspine strategy calls: ``begin_round(round, clients)``
with the round's sampled clients before they are assigned, and ``observe_round(round,
records)`` with the round's client records (its arm, seconds, FLOPs, bytes and losses).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedtune.core.protocol import ClientKey as K
from fedtune.core.protocol import Status
from fedtune.core.seeding import rng

__all__ = ["POLICIES", "Arm", "CostUCB", "Policy", "Speed", "arm_grid", "make_policy", "policy_options"]

log = logging.getLogger("fedtune.fleet")


@dataclass(frozen=True)
class Arm:
    ratio: float  # target pruning ratio
    rank: int  # LoRA rank


@runtime_checkable
class Policy(Protocol):
    def assign(self, client_id: int, server_round: int) -> Arm: ...

    def update(self, client_id: int, arm: Arm, reward: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def arm_grid(ratios: list[float], ranks: list[int]) -> list[Arm]:
    return [Arm(float(p), int(r)) for p in ratios for r in ranks]


def _finite_reward(policy: Any, client_id: int, arm: Arm, reward: float) -> bool:
    """Whether a reward may enter a policy's statistics; a non-finite one is skipped and logged."""
    try:
        ok = math.isfinite(float(reward))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        log.warning("%s: skipped the non-finite reward %r of client %s (arm %s)", type(policy).__name__, reward,
                    client_id, arm)
    return ok


def _rng(seed: int, key: Any) -> random.Random:
    """A learner's generator from (seed, client id or pooled learner name), stable across processes."""
    return rng(seed, "policy", key if isinstance(key, int) else str(key))


class _PerClient:
    """Base: one learner per client, created lazily; state is JSON-serialisable."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.learners: dict[int, dict[str, Any]] = {}
        self._rngs: dict[int, random.Random] = {}

    def rng(self, client_id: int) -> random.Random:
        if client_id not in self._rngs:
            self._rngs[client_id] = _rng(self.seed, client_id)
        return self._rngs[client_id]

    def learner(self, client_id: int) -> dict[str, Any]:
        if client_id not in self.learners:
            self.learners[client_id] = self.new_learner(client_id)
        return self.learners[client_id]

    def new_learner(self, client_id: int) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"learners": {str(k): v for k, v in self.learners.items()},
                "rngs": {str(k): r.getstate() for k, r in self._rngs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learners = {_key(k): v for k, v in state["learners"].items()}
        self._rngs = {}
        for k, s in state.get("rngs", {}).items():
            r = random.Random()
            r.setstate(_as_rng_state(s))
            self._rngs[_key(k)] = r


def _key(k: str) -> Any:
    """A learner key back from JSON: client ids are ints, pooled learners are named."""
    return int(k) if k.lstrip("-").isdigit() else k


def _as_rng_state(s: Any) -> tuple[Any, ...]:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


class _Discrete(_PerClient):
    def __init__(self, arms: list[Arm], seed: int = 0) -> None:
        super().__init__(seed)
        if not arms:
            raise ValueError("a bandit needs at least one arm")
        self.arms = list(arms)

    def new_learner(self, client_id: int) -> dict[str, Any]:
        return {"n": [0.0] * len(self.arms), "s": [0.0] * len(self.arms), "t": 0}

    def index_of(self, arm: Arm) -> int:
        return self.arms.index(arm)

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        if not _finite_reward(self, client_id, arm, reward):
            return
        st = self.learner(client_id)
        i = self.index_of(arm)
        st["n"][i] += 1.0
        st["s"][i] += float(reward)
        st["t"] += 1

    def _untried(self, client_id: int) -> Arm | None:
        st = self.learner(client_id)
        untried = [i for i, n in enumerate(st["n"]) if n == 0]
        if untried:
            return self.arms[self.rng(client_id).choice(untried)]
        return None


class StaticPolicy(_Discrete):
    """Always the arm of the client's class (``classes``: client id -> class name)."""

    def __init__(self, arms_by_class: dict[str, Arm], classes: dict[int, str], seed: int = 0) -> None:
        super().__init__(list(arms_by_class.values()), seed)
        self.arms_by_class, self.classes = arms_by_class, classes

    def assign(self, client_id: int, server_round: int) -> Arm:
        cls = self.classes.get(client_id)
        if cls not in self.arms_by_class:
            raise KeyError(f"static policy: client {client_id} has no class with an arm (class {cls!r})")
        return self.arms_by_class[cls]


class RandomPolicy(_Discrete):
    def assign(self, client_id: int, server_round: int) -> Arm:
        return self.rng(client_id).choice(self.arms)


class EpsilonGreedy(_Discrete):
    def __init__(self, arms: list[Arm], epsilon: float = 0.1, seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.epsilon = epsilon

    def assign(self, client_id: int, server_round: int) -> Arm:
        st, rng = self.learner(client_id), self.rng(client_id)
        first = self._untried(client_id)
        if first is not None:
            return first
        if rng.random() < self.epsilon:
            return rng.choice(self.arms)
        means = [s / n for s, n in zip(st["s"], st["n"])]
        return self.arms[max(range(len(means)), key=means.__getitem__)]


class UCB1(_Discrete):
    def __init__(self, arms: list[Arm], c: float = math.sqrt(2), seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.c = c

    def scores(self, st: dict[str, Any]) -> list[float]:
        total = sum(st["n"])
        return [s / n + self.c * math.sqrt(math.log(max(total, 1.0)) / n) for s, n in zip(st["s"], st["n"])]

    def assign(self, client_id: int, server_round: int) -> Arm:
        first = self._untried(client_id)
        if first is not None:
            return first
        sc = self.scores(self.learner(client_id))
        return self.arms[max(range(len(sc)), key=sc.__getitem__)]


class DiscountedUCB(UCB1):
    """UCB on statistics discounted by ``gamma`` per update (Garivier & Moulines 2011)."""

    def __init__(self, arms: list[Arm], gamma: float = 0.98, c: float = 0.1, seed: int = 0) -> None:
        super().__init__(arms, c, seed)
        self.gamma = gamma

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        if not _finite_reward(self, client_id, arm, reward):
            return
        st = self.learner(client_id)
        st["n"] = [self.gamma * n for n in st["n"]]
        st["s"] = [self.gamma * s for s in st["s"]]
        super().update(client_id, arm, reward)

    def _untried(self, client_id: int) -> Arm | None:
        st = self.learner(client_id)
        untried = [i for i, n in enumerate(st["n"]) if n < 1e-9]
        return self.arms[self.rng(client_id).choice(untried)] if untried else None


class SlidingWindowUCB(_Discrete):
    """UCB over the last ``window`` pulls of each client (Garivier & Moulines 2011)."""

    def __init__(self, arms: list[Arm], window: int = 50, c: float = 0.1, seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.window, self.c = window, c

    def new_learner(self, client_id: int) -> dict[str, Any]:
        return {"history": []}

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        if not _finite_reward(self, client_id, arm, reward):
            return
        hist = self.learner(client_id)["history"]
        hist.append([self.index_of(arm), float(reward)])
        del hist[: max(0, len(hist) - self.window)]

    def assign(self, client_id: int, server_round: int) -> Arm:
        hist = self.learner(client_id)["history"]
        n, s = [0.0] * len(self.arms), [0.0] * len(self.arms)
        for i, r in hist:
            n[int(i)] += 1
            s[int(i)] += r
        untried = [i for i, k in enumerate(n) if k == 0]
        if untried:
            return self.arms[self.rng(client_id).choice(untried)]
        total = sum(n)
        sc = [si / ni + self.c * math.sqrt(math.log(total) / ni) for si, ni in zip(s, n)]
        return self.arms[max(range(len(sc)), key=sc.__getitem__)]


class EXP3(_Discrete):
    """Exponential weights for adversarial bandits (Auer et al. 2002)."""

    def __init__(self, arms: list[Arm], gamma: float = 0.1, seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.gamma = gamma

    def new_learner(self, client_id: int) -> dict[str, Any]:
        return {"logw": [0.0] * len(self.arms)}

    def probs(self, st: dict[str, Any]) -> list[float]:
        m = max(st["logw"])
        w = [math.exp(x - m) for x in st["logw"]]
        total = sum(w)
        k = len(w)
        return [(1 - self.gamma) * x / total + self.gamma / k for x in w]

    def assign(self, client_id: int, server_round: int) -> Arm:
        p = self.probs(self.learner(client_id))
        return self.rng(client_id).choices(self.arms, weights=p)[0]

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        if not _finite_reward(self, client_id, arm, reward):
            return
        st = self.learner(client_id)
        i = self.index_of(arm)
        p = self.probs(st)[i]
        st["logw"][i] += self.gamma * (reward / p) / len(self.arms)


class ThompsonSampling(_Discrete):
    """Gaussian Thompson sampling: each arm once, then draws from N(mean, sigma^2 / n)."""

    def __init__(self, arms: list[Arm], sigma: float = 0.1, seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.sigma = sigma

    def assign(self, client_id: int, server_round: int) -> Arm:
        first = self._untried(client_id)
        if first is not None:
            return first
        st, rng = self.learner(client_id), self.rng(client_id)
        draws = [rng.gauss(s / n, self.sigma / math.sqrt(n)) for s, n in zip(st["s"], st["n"])]
        return self.arms[max(range(len(draws)), key=draws.__getitem__)]


@dataclass(frozen=True)
class Speed:
    """A client-round's observed speed, as the strategy reports it to :meth:`AdaptiveUCB.observe`.

    On a simulated fleet the records carry the work the arm gave the client (``flops``, and
    ``comm_bytes`` received + sent) beside the seconds each took (``sim_compute_s``,
    ``sim_comm_s``), so the device's rates (FLOP/s, bytes/s) are known whatever arm it played.
    On a real deployment only the client's wall seconds are known, and they mix the device's
    speed with the arm's cost (documented fallback)."""

    seconds: float  # completion seconds: simulated when present, else wall train seconds
    flops: float = math.nan
    compute_s: float = math.nan
    comm_bytes: float = math.nan
    comm_s: float = math.nan

    @property
    def flop_rate(self) -> float | None:
        return self.flops / self.compute_s if _positive(self.flops, self.compute_s) else None

    @property
    def byte_rate(self) -> float | None:
        return self.comm_bytes / self.comm_s if _positive(self.comm_bytes, self.comm_s) else None

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Speed:
        def f(key: str, default: Any = math.nan) -> float:
            try:
                return float(rec.get(key, default))
            except (TypeError, ValueError):
                return math.nan

        return cls(seconds=f(K.SIM_SECONDS, rec.get(K.TRAIN_TIME_S, math.nan)), flops=f(K.FLOPS),
                   compute_s=f(K.SIM_COMPUTE_S), comm_bytes=f(K.COMM_BYTES), comm_s=f(K.SIM_COMM_S))


def _positive(*xs: float) -> bool:
    return all(x is not None and math.isfinite(x) and x > 0 for x in xs)


class AdaptiveUCB(_PerClient):
    """UCB over ratio cells x ranks; ``gamma < 1`` discounts statistics once per round.

    ``gamma = 1`` with ``refine=True`` is FedMP's E-UCB; ``gamma < 1`` is the S-UCB
    reconstruction (module doc). ``ratios`` are the configured ratios: each is the point (the
    played ratio) of its own cell, whose edges lie halfway to its neighbours. With ``refine``,
    a cell pulled ``split_after`` times and at least ``2 * min_width`` wide splits at its middle:
    the half holding its point keeps the point and its statistics, the other half gets its own
    midpoint as a new, untried arm; configured ratios stay playable.
    ``pool``: ``"none"`` (a learner per client) or ``"speed"`` (a learner per observed speed tier).
    """

    POOLS = ("none", "speed")

    def __init__(self, ranks: list[int], ratios: list[float] | tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), *,
                 gamma: float = 0.98, c: float = 0.1, refine: bool = False, split_after: int = 4,
                 min_width: float = 0.02, pool: str = "none", speed_ema: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed)
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        self.pool, self.speed_ema = pool, float(speed_ema)
        self.speed: dict[int, float] = {}  # client -> EMA of log2(device seconds / reference)
        self.reference: float | None = None  # the median device seconds of the first round observed
        self.workload: list[float] | None = None  # [FLOPs, bytes] of the reference workload (simulated fleet)
        self.round = 0  # the latest round assigned; statistics decay by gamma per round elapsed
        self._pending: dict[tuple[Any, int, float], float] = {}  # this round's unrewarded assignments
        self._pending_round = -1
        if not ranks:
            raise ValueError("a bandit needs at least one rank")
        points = sorted({round(float(r), 4) for r in ratios})
        if not points or not all(0.0 <= r < 1.0 for r in points):
            raise ValueError(f"ratios must be in [0, 1), got {list(ratios)}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.ranks, self.points = list(ranks), points
        self.lo, self.hi = points[0], points[-1]
        self.gamma, self.c, self.refine = gamma, c, bool(refine)
        self.split_after, self.min_width = int(split_after), float(min_width)

    def new_learner(self, client_id: int) -> dict[str, Any]:
        # a cell: [lo, hi, rank, n (discounted), s (discounted), pulls since creation, point (the played ratio)]
        p = self.points
        edges = [p[0]] + [(a + b) / 2 for a, b in itertools.pairwise(p)] + [p[-1]]
        return {"cells": [[edges[i], edges[i + 1], r, 0.0, 0.0, 0, p[i]] for r in self.ranks for i in range(len(p))],
                "round": self.round}

    def key(self, client_id: int) -> Any:
        """The learner a client uses: itself, or its speed tier when pooling."""
        if self.pool == "none":
            return client_id
        if client_id not in self.speed:
            return "new"
        return f"tier{round(self.speed[client_id]):+d}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "speed": {str(k): v for k, v in self.speed.items()},
                "reference": self.reference, "workload": self.workload, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for st in self.learners.values():  # a checkpoint from before cells had points played their midpoints
            for c in st.get("cells", []):
                if len(c) == 6:
                    c.append(round((c[0] + c[1]) / 2, 4))
        self.speed = {int(k): float(v) for k, v in state.get("speed", {}).items()}
        self.reference = state.get("reference")
        self.workload = state.get("workload")
        self.round = int(state.get("round", 0))

    # ------------------------------------------------------------------ speed tiers

    def device_seconds(self, s: Speed) -> float | None:
        """The seconds the client's device would take on the reference workload: arm-normalised
        when the FLOP/s (and bytes/s) are known, else its raw seconds (real deployments)."""
        fr, br = s.flop_rate, s.byte_rate
        if fr is not None and self.workload is not None:
            t = self.workload[0] / fr
            if br is not None:
                t += self.workload[1] / br
            return t
        return s.seconds if _positive(s.seconds) else None

    def observe(self, speeds: dict[int, Speed]) -> None:
        """A round's observed speeds of its finished clients (the strategy reports them after each
        round). The first round that reports rates fixes the reference workload (its median FLOPs
        and bytes); the first round observed fixes the reference seconds (its median device
        seconds). A client's tier is the octave of the EMA of ``log2(device seconds / reference)``."""
        if self.workload is None and self.reference is None:
            rated = [s for s in speeds.values() if s.flop_rate is not None]
            if rated:
                self.workload = [_median([s.flops for s in rated]),
                                 _median([s.comm_bytes for s in rated if s.byte_rate is not None] or [0.0])]
        seconds = {c: self.device_seconds(s) for c, s in speeds.items()}
        seconds = {c: t for c, t in seconds.items() if t is not None and math.isfinite(t) and t > 0}
        if not seconds:
            return
        if self.reference is None:
            self.reference = _median(list(seconds.values()))
        for client_id, t in seconds.items():
            x = math.log2(t / self.reference)
            prev = self.speed.get(client_id)
            self.speed[client_id] = x if prev is None else self.speed_ema * prev + (1 - self.speed_ema) * x

    # ------------------------------------------------------------------ UCB

    def _decay_to(self, st: dict[str, Any], server_round: int) -> None:
        """Discount the learner's statistics by gamma once per round elapsed since its last decay."""
        last = int(st.get("round", server_round))
        if server_round > last:
            decay = self.gamma ** (server_round - last)
            for c in st["cells"]:
                c[3] *= decay
                c[4] *= decay
        st["round"] = max(last, server_round)

    def _pick(self, client_id: int) -> list[Any]:
        """UCB over the learner's cells, counting this round's assignments not yet rewarded as
        pulls at the cell's current mean ("pending pulls", batched UCB): clients sharing a pooled
        learner within one round spread over the cells instead of all getting the same arm."""
        key = self.key(client_id)
        st = self.learner(key)
        self._decay_to(st, self.round)
        cells = st["cells"]
        rng = self.rng(key)

        def pending(c: list[Any]) -> float:
            return self._pending.get((key, c[2], c[6]), 0.0)

        untried = [c for c in cells if c[3] + pending(c) < 1e-9]
        if untried:
            return rng.choice(untried)
        total = sum(c[3] + pending(c) for c in cells)

        def score(c: list[Any]) -> float:
            n = c[3] + pending(c)
            mean = c[4] / c[3] if c[3] > 1e-9 else 0.5  # a cell only pending: an uninformed mean
            return mean + self.c * math.sqrt(math.log(max(total, 1.0 + 1e-9)) / n)

        return max(cells, key=score)

    def assign(self, client_id: int, server_round: int) -> Arm:
        if int(server_round) != self._pending_round:  # a new round: last round's pulls were rewarded
            self._pending, self._pending_round = {}, int(server_round)
        self.round = max(self.round, int(server_round))
        cell = self._pick(client_id)
        slot = (self.key(client_id), cell[2], cell[6])
        self._pending[slot] = self._pending.get(slot, 0.0) + 1.0
        return Arm(cell[6], int(cell[2]))

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        if not _finite_reward(self, client_id, arm, reward):
            return
        st = self.learner(self.key(client_id))
        self._decay_to(st, self.round)
        cells = [c for c in st["cells"] if c[2] == arm.rank]
        cell = next((c for c in cells if abs(c[6] - arm.ratio) < 1e-9), None) or next(
            (c for c in cells if c[0] <= arm.ratio < c[1] or arm.ratio == c[1] == self.hi), None)
        if cell is None:
            raise ValueError(f"arm {arm} lies in no cell of client {client_id}'s learner")
        cell[3] += 1.0
        cell[4] += float(reward)
        cell[5] += 1
        if self.refine and cell[5] >= self.split_after and cell[1] - cell[0] >= 2 * self.min_width - 1e-12:
            mid = (cell[0] + cell[1]) / 2
            halves = [[cell[0], mid], [mid, cell[1]]]
            keep = 0 if cell[6] <= mid else 1
            children = []
            for i, (lo, hi) in enumerate(halves):
                if i == keep:  # every pull of the cell was at its point: that half keeps them
                    children.append([lo, hi, cell[2], cell[3], cell[4], 0, cell[6]])
                else:
                    children.append([lo, hi, cell[2], 0.0, 0.0, 0, round((lo + hi) / 2, 4)])
            i = st["cells"].index(cell)
            st["cells"][i: i + 1] = children


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


class SUCB(AdaptiveUCB):
    """FedSpine's S-UCB, reconstructed: UCB over the configured (ratio, rank) arms, discounted once
    per round, optionally refined (``refine=True``), pooled over observed speed tiers unless
    ``pool="none"`` (module doc)."""

    def __init__(self, ranks: list[int], ratios: list[float] | tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
                 **kwargs: Any) -> None:
        kwargs.setdefault("pool", "speed")
        super().__init__(ranks, ratios, **kwargs)


class EUCB(AdaptiveUCB):
    """FedMP's E-UCB (Jiang et al., ICDE 2022): adaptive partitioning (refinement on) without discounting."""

    def __init__(self, ranks: list[int], ratios: list[float] | tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
                 **kwargs: Any) -> None:
        kwargs["gamma"] = 1.0
        kwargs.setdefault("refine", True)
        super().__init__(ranks, ratios, **kwargs)


class CostUCB:
    """Cost-aware UCB: predicted seconds per (device, arm), a bound on the round, UCB on loss drop per second.

    S-UCB learns one reward that mixes an arm's quality with the device's speed. This policy
    separates the two, in the manner of Oort's guided participant selection (Lai et al.,
    "Oort: Efficient Federated Learning via Guided Participant Selection", OSDI 2021: a
    statistical utility learned from training losses, divided by a system utility from
    observed durations, with a developer-set round duration) and of budgeted bandits with
    variable costs (Ding et al., "Multi-Armed Bandit with Budget Constraint and Variable
    Costs", AAAI 2013: UCB on reward per unit cost), with FedCS's rule of never scheduling
    work predicted to overrun the round (Nishio & Yonetani, "Client Selection for Federated
    Learning with Heterogeneous Resources in Mobile Edge", ICC 2019):

    - **Speeds, from the seconds each device reports, no profiles.** After every round
      (:meth:`observe_round`, called by the fedspine strategy with the round's client records)
      a device's FLOP/s (``flops / sim_compute_s``) and bytes/s (``comm_bytes / sim_comm_s``)
      enter an exponential moving average of their log2 (weight ``speed_ema`` on the past), so
      drift is followed. The work of an arm (its FLOPs and bytes) is the running mean of what
      clients that played it reported from the same sparsity (else from any); an arm nobody
      played yet is priced from the nearest played one (same ratio first), scaled up by the
      ratio of ranks (conservative: the frozen model's work does not grow with the rank). An
      arm's predicted seconds on a device are ``flops / flop_rate + bytes / byte_rate``.
      Records without FLOPs or bytes (a real deployment) fall back to the device's own seconds
      per arm, other arms scaled by rank.
    - **The bound.** At the start of a round (:meth:`begin_round`, called with the round's
      sampled clients) each client's cheapest predicted seconds are computed (a client not
      seen yet at the fleet's median speeds). The round cannot be shorter than the largest of
      them, its *floor* ``F``; the bound is ``B = round_time_bound x`` their median, or
      ``round_time_bound_s`` seconds when that is > 0, both set from outside the policy
      (``policy.round_time_bound``, ``policy.round_time_bound_s``). A client may play an arm
      only when its predicted seconds stay within ``max(F, B)``: within the floor it costs the
      round nothing, past ``B`` never. Its cheapest arm is always allowed.
    - **UCB in the target's units.** An arm's utility is the client's relative training-loss
      drop over the round, ``u = (loss_start - train_loss) / loss_start`` (the first quarter
      of its local steps against all of them), pooled over every client that played the arm
      *from the same sparsity* (the context: the sparsity the client last reported, 0 before;
      the same arm prunes a fresh client and an already pruned one differently), discounted
      by ``gamma`` once per round (it drifts as training converges). Among the allowed arms a
      client plays the one maximising the round's loss drop per second,
      ``(G + UCB(a)) / max(F, t(a))``, with ``UCB(a) = mean(a) + c x ubar x sqrt(log N / n(a))``
      (``ubar`` the mean utility, so ``c`` is unitless) and ``G = (m - 1) x ubar`` what the
      round's other ``m - 1`` clients are expected to add. Allowed arms not yet played in the
      client's context are tried first (the cheapest of them); this round's assignments count
      as pending pulls (batched UCB), so a round's clients spread over untried arms.
    - **Unseen devices start at the cheapest arm**: the one predicted fastest at the fleet's
      median speeds, or before any observation the smallest rank at the largest ratio (the
      least to send and, once pruned, the least to compute). An arm that ran a device out of
      memory is never assigned to that device again.

    Without :meth:`begin_round` (a strategy that does not call it) the floor is the largest
    cheapest-arm prediction among the round's clients assigned so far, and the median is over
    every device seen. The reward passed to :meth:`update` is not used: the utility comes
    from the records. The state (speeds, sparsities, arm work, statistics) is JSON-serialisable.
    """

    CONFIG_KEYS = ("round_time_bound", "round_time_bound_s")  # [policy] keys the strategy passes in

    def __init__(self, ranks: list[int], ratios: list[float] | tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), *,
                 round_time_bound: float = 1.5, round_time_bound_s: float = 0.0, c: float = 0.5, gamma: float = 0.98,
                 speed_ema: float = 0.5, seed: int = 0) -> None:
        if not ranks:
            raise ValueError("a bandit needs at least one rank")
        if round_time_bound < 1.0 or round_time_bound_s < 0:
            raise ValueError(f"round_time_bound must be >= 1 and round_time_bound_s >= 0, got {round_time_bound},"
                             f" {round_time_bound_s}")
        if not 0.0 < gamma <= 1.0 or not 0.0 <= speed_ema < 1.0:
            raise ValueError(f"gamma must be in (0, 1] and speed_ema in [0, 1), got {gamma}, {speed_ema}")
        self.arms = arm_grid(sorted(set(ratios)), sorted(set(ranks)))
        self.keys = [_arm_key(a) for a in self.arms]
        self._all = list(range(len(self.arms)))
        # a priori cheapest first: smallest rank, then largest ratio
        order = sorted(self._all, key=lambda i: (self.arms[i].rank, -self.arms[i].ratio))
        self._prior_rank = [order.index(i) for i in self._all]
        self.bound, self.bound_s = float(round_time_bound), float(round_time_bound_s)
        self.c, self.gamma, self.speed_ema, self.seed = float(c), float(gamma), float(speed_ema), seed
        self.rates: dict[int, list[float]] = {}  # client -> [log2 FLOP/s, log2 bytes/s] (EMA)
        self.seconds: dict[int, dict[str, float]] = {}  # fallback: client -> arm -> log2 seconds (EMA)
        self.sparsity: dict[int, float] = {}  # client -> the sparsity it last reported
        self.work: dict[str, list[float]] = {}  # "context|arm" and "arm" -> [mean FLOPs, mean bytes, count]
        self.stats: dict[str, list[float]] = {}  # "context|arm" -> [n, sum of u] (discounted)
        self.failed: dict[int, list[str]] = {}  # client -> arms that ran it out of memory
        self.round = 0  # the round the statistics were last discounted to
        self._plan: dict[str, Any] = {"round": -1}
        self._pending: dict[str, float] = {}
        self._invalidate()

    # ------------------------------------------------------------------ predictions

    def context(self, client_id: int) -> str:
        """The client's context: the sparsity it last reported (0 before it reported any)."""
        return f"{round(self.sparsity.get(client_id, 0.0), 2):g}"

    def arm_work(self, i: int, context: str = "0") -> tuple[float, float] | None:
        """(FLOPs, bytes) of arm ``i`` from ``context``: observed, or priced (class doc)."""
        if context not in self._work_cache:
            self._work_cache[context] = [self._price(j, context) for j in self._all]
        return self._work_cache[context][i]

    def _price(self, i: int, context: str) -> tuple[float, float] | None:
        for key in (f"{context}|{self.keys[i]}", self.keys[i]):
            if key in self.work:
                return self.work[key][0], self.work[key][1]
        arm = self.arms[i]
        seen = [j for j in self._all if self.keys[j] in self.work]
        if not seen:
            return None
        j = min(seen, key=lambda j: (self.arms[j].ratio != arm.ratio, abs(math.log(self.arms[j].rank / arm.rank)),
                                     -self.arms[j].rank))
        scale = max(1.0, arm.rank / self.arms[j].rank)
        return self.work[self.keys[j]][0] * scale, self.work[self.keys[j]][1] * scale

    def _median_rates(self) -> list[float] | None:
        if not self.rates:
            return None
        if self._median_cache is None:
            self._median_cache = [_median([r[0] for r in self.rates.values()]),
                                  _median([r[1] for r in self.rates.values()])]
        return self._median_cache

    def seen(self, client_id: int) -> bool:
        return client_id in self.rates or bool(self.seconds.get(client_id))

    def predict(self, client_id: int, arm: Arm | int, *, fleet_median: bool = False) -> float | None:
        """Predicted seconds of ``arm`` on the client's device (``None``: nothing known). With
        ``fleet_median``, an unseen client is predicted at the fleet's median speeds."""
        i = arm if isinstance(arm, int) else self.arms.index(arm)
        return self.times(client_id, fleet_median=fleet_median)[i]

    def times(self, client_id: int, *, fleet_median: bool = False) -> list[float | None]:
        """Predicted seconds of every arm on the client's device (cached until the next observation)."""
        seen = self.seen(client_id)
        if not seen and not fleet_median:
            return [None] * len(self.arms)
        key = (client_id if seen else None, self.context(client_id))  # unseen clients share the fleet median
        if key not in self._times_cache:
            self._times_cache[key] = self._predict_all(client_id, key[1])
        return self._times_cache[key]

    def _predict_all(self, client_id: int, context: str) -> list[float | None]:
        rates = self.rates.get(client_id)
        own = self.seconds.get(client_id)
        if rates is None and not own:
            rates = self._median_rates()
        out: list[float | None] = []
        if rates is not None:
            for i in self._all:
                work = self.arm_work(i, context)
                out.append(None if work is None else work[0] / 2.0 ** rates[0] + work[1] / 2.0 ** rates[1])
            return out
        if not own:
            return [None] * len(self.arms)
        for i, key in enumerate(self.keys):
            if key in own:
                out.append(2.0 ** own[key])
                continue
            k, log_s = min(own.items(), key=lambda kv: abs(math.log(_key_rank(kv[0]) / self.arms[i].rank)))
            out.append(2.0 ** log_s * max(1.0, self.arms[i].rank / _key_rank(k)))
        return out

    def _playable(self, client_id: int) -> list[int]:
        bad = self.failed.get(client_id)
        if not bad:
            return self._all
        return [i for i in self._all if self.keys[i] not in bad] or self._all

    def cheapest(self, client_id: int) -> int:
        """The client's cheapest arm: the fastest predicted (fleet median for an unseen client), else
        the a priori cheapest (smallest rank, largest ratio)."""
        playable = self._playable(client_id)
        times = self.times(client_id, fleet_median=True)
        known = [i for i in playable if times[i] is not None]
        if known:
            return min(known, key=lambda i: (times[i], self._prior_rank[i]))
        return min(playable, key=self._prior_rank.__getitem__)

    def _invalidate(self) -> None:
        self._work_cache: dict[str, list[tuple[float, float] | None]] = {}
        self._median_cache: list[float] | None = None
        self._times_cache: dict[tuple[int | None, str], list[float | None]] = {}

    # ------------------------------------------------------------------ the round

    def begin_round(self, server_round: int, clients: list[int]) -> None:
        """The round's sampled clients, before any is assigned: fixes the round's floor and bound."""
        floors = [self.predict(c, self.cheapest(c), fleet_median=True) for c in clients]
        floors = [t for t in floors if t is not None]
        self._plan = {"round": int(server_round), "m": len(clients),
                      "floor": max(floors) if floors else None, "median": _median(floors) if floors else None}

    def limit(self) -> float | None:
        """This round's bound on an arm's predicted seconds: ``max(floor, bound)`` (class doc)."""
        floor, median = self._plan.get("floor"), self._plan.get("median")
        bound = self.bound_s if self.bound_s > 0 else (self.bound * median if median is not None else None)
        if bound is None:
            return floor
        return bound if floor is None else max(floor, bound)

    def _fallback_plan(self, server_round: int, client_id: int) -> None:
        """No begin_round for this round: the floor from the clients assigned so far, the median over
        every device seen."""
        if self._plan.get("round") != server_round or not self._plan.get("fallback"):
            cheap = [self.predict(c, self.cheapest(c)) for c in set(self.rates) | set(self.seconds)]
            cheap = [t for t in cheap if t is not None]
            self._plan = {"round": server_round, "fallback": True, "m": 0, "floor": None,
                          "median": _median(cheap) if cheap else None}
        t = self.predict(client_id, self.cheapest(client_id), fleet_median=True)
        self._plan["m"] += 1
        if t is not None:
            self._plan["floor"] = t if self._plan["floor"] is None else max(self._plan["floor"], t)

    def _decay_to(self, server_round: int) -> None:
        if server_round > self.round:
            d = self.gamma ** (server_round - self.round)
            for st in self.stats.values():
                st[0] *= d
                st[1] *= d
            self.round = server_round

    def assign(self, client_id: int, server_round: int) -> Arm:
        server_round = int(server_round)
        if self._plan.get("round") != server_round or self._plan.get("fallback"):
            self._fallback_plan(server_round, client_id)
        if self._pending.get("_round") != server_round:
            self._pending = {"_round": server_round}
        self._decay_to(server_round)
        i = self._choose(client_id)
        cell = f"{self.context(client_id)}|{self.keys[i]}"
        self._pending[cell] = self._pending.get(cell, 0.0) + 1.0
        return self.arms[i]

    def _choose(self, client_id: int) -> int:
        cheapest = self.cheapest(client_id)
        if not self.seen(client_id):
            return cheapest
        limit = self.limit()
        times = self.times(client_id)
        allowed = [i for i in self._playable(client_id)
                   if times[i] is not None and (limit is None or times[i] <= limit * (1 + 1e-9))]
        if cheapest not in allowed:
            allowed.append(cheapest)
        ctx = self.context(client_id)
        cells = {i: f"{ctx}|{self.keys[i]}" for i in allowed}
        none = [0.0, 0.0]
        n = {i: self.stats.get(cells[i], none)[0] + self._pending.get(cells[i], 0.0) for i in allowed}
        untried = [i for i in allowed if n[i] < 1e-9]
        if untried:
            return min(untried, key=lambda i: (times[i] if times[i] is not None else math.inf, self._prior_rank[i]))
        total_n = sum(st[0] for st in self.stats.values())
        ubar = sum(st[1] for st in self.stats.values()) / total_n if total_n > 1e-9 else 0.0
        scale = abs(ubar) if abs(ubar) > 1e-12 else 1.0
        log_n = math.log(max(sum(n.values()), 1.0 + 1e-9))
        floor = self._plan.get("floor") or 0.0
        rest = max(int(self._plan.get("m") or 1) - 1, 0) * ubar

        def score(i: int) -> float:
            st = self.stats.get(cells[i], none)
            mean = st[1] / st[0] if st[0] > 1e-9 else ubar  # only pending this round: the mean utility
            ucb = mean + self.c * scale * math.sqrt(log_n / n[i])
            return (rest + ucb) / max(floor, times[i] or 0.0, 1e-12)

        return max(allowed, key=lambda i: (score(i), -self._prior_rank[i]))

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        """The strategy's reward is not used (a non-finite one is still logged): the utility and the
        speeds come from :meth:`observe_round`."""
        _finite_reward(self, client_id, arm, reward)

    def observe_round(self, server_round: int, records: list[dict[str, Any]]) -> None:
        """Learn from a round's client records: each device's speeds and sparsity, each arm's work and
        utility in the client's context (the sparsity it started the round at)."""
        self._decay_to(int(server_round))
        self._invalidate()
        for rec in records:
            played = rec.get(K.ARM)
            if not isinstance(played, dict) or K.CLIENT_ID not in rec:
                continue
            arm = Arm(float(played["ratio"]), int(played["rank"]))
            key, client = _arm_key(arm), int(rec[K.CLIENT_ID])
            if key not in self.keys:
                continue
            cell = f"{self.context(client)}|{key}"
            status = rec.get(K.STATUS)
            if status == Status.FAILED and "out of memory" in str(rec.get(K.REASON, "")):
                if key not in self.failed.setdefault(client, []):
                    self.failed[client].append(key)
                continue
            if status in (Status.OK, Status.DROPPED):
                self._learn_speed(client, key, cell, Speed.from_record(rec))
            if status == Status.OK:
                u = _utility(rec)
                if u is not None:
                    st = self.stats.setdefault(cell, [0.0, 0.0])
                    st[0] += 1.0
                    st[1] += u
                try:
                    reached = float(rec.get(K.PRUNE_RATIO, 0.0))
                except (TypeError, ValueError):
                    reached = math.nan
                if math.isfinite(reached) and 0.0 <= reached < 1.0:
                    self.sparsity[client] = reached

    def _learn_speed(self, client: int, key: str, cell: str, s: Speed) -> None:
        fr, br = s.flop_rate, s.byte_rate
        if fr is not None and br is not None:
            for k in (key, cell):
                w = self.work.setdefault(k, [0.0, 0.0, 0])
                w[2] += 1
                w[0] += (s.flops - w[0]) / w[2]
                w[1] += (s.comm_bytes - w[1]) / w[2]
            x = [math.log2(fr), math.log2(br)]
            prev = self.rates.get(client)
            self.rates[client] = x if prev is None else [self.speed_ema * p + (1 - self.speed_ema) * v
                                                         for p, v in zip(prev, x)]
        elif _positive(s.seconds):
            own = self.seconds.setdefault(client, {})
            x = math.log2(s.seconds)
            own[key] = x if key not in own else self.speed_ema * own[key] + (1 - self.speed_ema) * x

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"rates": {str(k): v for k, v in self.rates.items()},
                "seconds": {str(k): v for k, v in self.seconds.items()},
                "sparsity": {str(k): v for k, v in self.sparsity.items()}, "work": self.work, "stats": self.stats,
                "failed": {str(k): v for k, v in self.failed.items()}, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rates = {int(k): [float(x) for x in v] for k, v in state.get("rates", {}).items()}
        self.seconds = {int(k): {a: float(x) for a, x in v.items()} for k, v in state.get("seconds", {}).items()}
        self.sparsity = {int(k): float(v) for k, v in state.get("sparsity", {}).items()}
        self.work = {k: [float(v[0]), float(v[1]), int(v[2])] for k, v in state.get("work", {}).items()}
        self.stats = {k: [float(v[0]), float(v[1])] for k, v in state.get("stats", {}).items()}
        self.failed = {int(k): list(v) for k, v in state.get("failed", {}).items()}
        self.round = int(state.get("round", 0))
        self._plan, self._pending = {"round": -1}, {}
        self._invalidate()


def _arm_key(arm: Arm) -> str:
    return f"{round(float(arm.ratio), 4)}/{int(arm.rank)}"


def _key_rank(key: str) -> int:
    return int(key.split("/")[1])


def _utility(rec: dict[str, Any]) -> float | None:
    """A finished client's relative training-loss drop over its round, or None when unknown."""
    try:
        start, mean = float(rec.get(K.LOSS_START)), float(rec.get(K.TRAIN_LOSS))
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(start) and math.isfinite(mean) and start > 0):
        return None
    return (start - mean) / start


def policy_options(name: str, config: Any) -> dict[str, Any]:
    """The ``[policy]`` keys a registered policy reads beyond ``policy.args`` (its ``CONFIG_KEYS``),
    taken from ``config`` (a :class:`fedtune.core.config.PolicyConfig`)."""
    cls = POLICIES.get(name)
    return {key: getattr(config, key) for key in getattr(cls, "CONFIG_KEYS", ())}


POLICIES: dict[str, type] = {
    "static": StaticPolicy, "random": RandomPolicy, "epsilon-greedy": EpsilonGreedy, "ucb1": UCB1,
    "discounted-ucb": DiscountedUCB, "sliding-window-ucb": SlidingWindowUCB, "exp3": EXP3,
    "thompson": ThompsonSampling, "e-ucb": EUCB, "s-ucb": SUCB, "cost-ucb": CostUCB,
}


def make_policy(name: str, *, ratios: list[float], ranks: list[int], seed: int = 0, **kwargs: Any) -> Any:
    """Build a registered policy; discrete ones get the (ratio x rank) grid as arms."""
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    cls = POLICIES[name]
    if issubclass(cls, (AdaptiveUCB, CostUCB)):
        return cls(ranks, list(ratios), seed=seed, **kwargs)
    if cls is StaticPolicy:
        return cls(seed=seed, **kwargs)
    return cls(arm_grid(ratios, ranks), seed=seed, **kwargs)
