"""Bandit policies that choose each client's (pruning ratio, LoRA rank) every round.

FedSpine (arXiv 2501.02438) learns, per device and from observed outcomes only, which
pruning ratio and LoRA rank to assign; its S-UCB formula is not public, so
:class:`SUCB` here is a documented reconstruction:

- an arm is ``(ratio, rank)``; ranks are a finite set, the ratio axis ``[lo, hi)`` starts
  as ``initial_cells`` equal cells per rank and is partitioned adaptively: a cell pulled ``split_after`` times is split in two
  (as FedMP's E-UCB does, Jiang et al. 2022), so the search refines where it is pulled;
- statistics are discounted by ``gamma`` each round (rewards drift as training converges):
  ``N_c <- gamma^k N_c + [c pulled]``, ``S_c <- gamma^k S_c + [c pulled] r``, with ``k`` the
  rounds since the learner's last update (at least 1);
- a client picks the cell maximising ``S_c / N_c + c_explore * sqrt(log(sum N) / N_c)``
  (unpulled cells first, in a seeded order) and plays the cell's midpoint ratio.
  A split cell's children inherit half of its statistics each.
- within a round, assignments not yet rewarded count as pulls at the cell's mean (batched UCB),
  so the clients of one round that share a learner do not all get the same arm;
- ``pool = "speed"`` (S-UCB's default here): FedSpine runs a learner per device, which needs
  many pulls per device; with 80 devices and a tenth sampled per round a device is seen a few
  times in a whole run. So clients share one learner per *speed tier*, learned from outcomes
  only: after every round the strategy reports each client's completion time and the round's
  median (:meth:`AdaptiveUCB.observe`); the first median seen is kept as the reference, and a
  client's tier is the octave of the EMA of ``log2(seconds / reference)`` (clients within 2x
  of each other share statistics); a client never observed yet uses the ``new`` learner.
  ``pool = "none"`` is one learner per client.

Every policy implements the :class:`Policy` protocol and keeps one independent learner
per client, seeded from ``(seed, client_id)``, so a run is reproducible. Rewards are in
[0, 1]; see :func:`fedtune.fleet.rewards.fedspine_reward`. Baselines: static by device class,
random, epsilon-greedy, UCB1, discounted UCB, sliding-window UCB, EXP3, Thompson
sampling (Gaussian), and FedMP's E-UCB (adaptive partitioning, no discounting).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedtune.core.seeding import rng

__all__ = ["Arm", "Policy", "POLICIES", "make_policy", "arm_grid"]


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


class AdaptiveUCB(_PerClient):
    """UCB over adaptively split ratio cells x ranks; ``gamma < 1`` discounts statistics.

    ``gamma = 1`` is FedMP's E-UCB; ``gamma < 1`` is the S-UCB reconstruction (module doc).
    ``pool``: ``"none"`` (a learner per client) or ``"speed"`` (a learner per observed speed tier).
    """

    POOLS = ("none", "speed")

    def __init__(self, ranks: list[int], ratio_range: tuple[float, float] = (0.0, 0.6), *, gamma: float = 0.98,
                 c: float = 0.1, split_after: int = 4, min_width: float = 0.1, initial_cells: int = 2,
                 pool: str = "none", speed_ema: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed)
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        self.pool, self.speed_ema = pool, float(speed_ema)
        self.speed: dict[int, float] = {}  # client -> EMA of log2(seconds / reference)
        self.reference: float | None = None  # the first round median observed
        self.round = 0  # the latest round assigned; statistics decay by gamma per round
        self._pending: dict[tuple[Any, int, float], float] = {}  # this round's unrewarded assignments
        self._pending_round = -1
        if not ranks:
            raise ValueError("a bandit needs at least one rank")
        lo, hi = ratio_range
        if not 0.0 <= lo < hi < 1.0:
            raise ValueError(f"ratio_range must satisfy 0 <= lo < hi < 1, got {ratio_range}")
        self.ranks, self.lo, self.hi = list(ranks), lo, hi
        self.gamma, self.c, self.split_after, self.min_width = gamma, c, split_after, min_width
        self.initial_cells = max(1, int(initial_cells))

    def new_learner(self, client_id: int) -> dict[str, Any]:
        # a cell: [lo, hi, rank, n (discounted), s (discounted), pulls since creation]
        k, width = self.initial_cells, (self.hi - self.lo) / self.initial_cells
        return {"cells": [[self.lo + i * width, self.lo + (i + 1) * width, r, 0.0, 0.0, 0]
                          for r in self.ranks for i in range(k)]}

    def key(self, client_id: int) -> Any:
        """The learner a client uses: itself, or its speed tier when pooling."""
        if self.pool == "none":
            return client_id
        if client_id not in self.speed:
            return "new"
        return f"tier{round(self.speed[client_id]):+d}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "speed": {str(k): v for k, v in self.speed.items()},
                "reference": self.reference, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.speed = {int(k): float(v) for k, v in state.get("speed", {}).items()}
        self.reference = state.get("reference")
        self.round = int(state.get("round", 0))

    def observe(self, client_id: int, seconds: float, median_seconds: float) -> None:
        """An outcome the strategy reports after each round: the client's completion time."""
        if seconds <= 0 or median_seconds <= 0 or not math.isfinite(seconds / median_seconds):
            return
        if self.reference is None:
            self.reference = float(median_seconds)
        x = math.log2(seconds / self.reference)
        prev = self.speed.get(client_id)
        self.speed[client_id] = x if prev is None else self.speed_ema * prev + (1 - self.speed_ema) * x

    def _pick(self, client_id: int) -> list[Any]:
        """UCB over the learner's cells, counting this round's assignments not yet rewarded as
        pulls at the cell's current mean ("pending pulls", batched UCB): clients sharing a pooled
        learner within one round spread over the cells instead of all getting the same arm."""
        key = self.key(client_id)
        cells = self.learner(key)["cells"]
        rng = self.rng(key)

        def pending(c: list[Any]) -> float:
            return self._pending.get((key, c[2], c[0]), 0.0)

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
        slot = (self.key(client_id), cell[2], cell[0])
        self._pending[slot] = self._pending.get(slot, 0.0) + 1.0
        return Arm(round((cell[0] + cell[1]) / 2, 4), int(cell[2]))  # the cell's midpoint

    def update(self, client_id: int, arm: Arm, reward: float) -> None:
        st = self.learner(self.key(client_id))
        decay = self.gamma ** max(1, self.round - st.get("round", self.round - 1))  # once per round elapsed
        st["round"] = self.round
        for c in st["cells"]:
            c[3] *= decay
            c[4] *= decay
        cell = next((c for c in st["cells"] if c[2] == arm.rank and c[0] <= arm.ratio < c[1]
                     or (c[2] == arm.rank and arm.ratio == c[1] == self.hi)), None)
        if cell is None:
            raise ValueError(f"arm {arm} lies in no cell of client {client_id}'s learner")
        cell[3] += 1.0
        cell[4] += float(reward)
        cell[5] += 1
        if cell[5] >= self.split_after and cell[1] - cell[0] >= 2 * self.min_width:
            mid = (cell[0] + cell[1]) / 2
            left = [cell[0], mid, cell[2], cell[3] / 2, cell[4] / 2, 0]
            right = [mid, cell[1], cell[2], cell[3] / 2, cell[4] / 2, 0]
            i = st["cells"].index(cell)
            st["cells"][i: i + 1] = [left, right]


class SUCB(AdaptiveUCB):
    """FedSpine's S-UCB, reconstructed: discounted, adaptively partitioned UCB (module doc),
    pooled over observed speed tiers unless ``pool="none"``."""

    def __init__(self, ranks: list[int], ratio_range: tuple[float, float] = (0.0, 0.6), **kwargs: Any) -> None:
        kwargs.setdefault("pool", "speed")
        super().__init__(ranks, ratio_range, **kwargs)


class EUCB(AdaptiveUCB):
    """FedMP's E-UCB (Jiang et al., ICDE 2022): adaptive partitioning without discounting."""

    def __init__(self, ranks: list[int], ratio_range: tuple[float, float] = (0.0, 0.6), **kwargs: Any) -> None:
        kwargs["gamma"] = 1.0
        super().__init__(ranks, ratio_range, **kwargs)


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
        return cls(ranks, (min(ratios), max(ratios)), seed=seed, **kwargs)
    if cls is StaticPolicy:
        return cls(seed=seed, **kwargs)
    return cls(arm_grid(ratios, ranks), seed=seed, **kwargs)
