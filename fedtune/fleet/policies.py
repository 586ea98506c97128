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
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedtune.core.protocol import ClientKey as K
from fedtune.core.seeding import rng

__all__ = ["POLICIES", "Arm", "Policy", "Speed", "arm_grid", "make_policy"]

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


POLICIES: dict[str, type] = {
    "static": StaticPolicy, "random": RandomPolicy, "epsilon-greedy": EpsilonGreedy, "ucb1": UCB1,
    "discounted-ucb": DiscountedUCB, "sliding-window-ucb": SlidingWindowUCB, "exp3": EXP3,
    "thompson": ThompsonSampling, "e-ucb": EUCB, "s-ucb": SUCB,
}


def make_policy(name: str, *, ratios: list[float], ranks: list[int], seed: int = 0, **kwargs: Any) -> Any:
    """Build a registered policy; discrete ones get the (ratio x rank) grid as arms."""
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    cls = POLICIES[name]
    if issubclass(cls, AdaptiveUCB):
        return cls(ranks, list(ratios), seed=seed, **kwargs)
    if cls is StaticPolicy:
        return cls(seed=seed, **kwargs)
    return cls(arm_grid(ratios, ranks), seed=seed, **kwargs)
