"""Hidden and drifting heterogeneity: what no datasheet tells about a device.

A device's class (its profile) fixes its nominal peak throughput and link bandwidths, the
only thing a policy that reads datasheets can know. Real fleets of one class differ: a board
runs hotter or shares its CPU, a phone sits far from its access point. With hidden
heterogeneity on, every device gets, from the run's seed, two *hidden multipliers* that no
profile shows, and a fraction of the devices *drifts* between states while the run goes on:

- ``fleet.hidden_compute``: the device's compute speed multiplier, drawn once per device.
  ``fleet.hidden_compute_draw = "log-uniform"`` reads the list as a range ``[low, high]``
  (log-uniform: ``[0.25, 4.0]`` makes x0.5 as likely as x2); ``"choice"`` picks one of the
  listed values with equal odds (``[0.5, 1.0]``: half the devices compute at half speed).
- ``fleet.hidden_link`` / ``fleet.hidden_link_draw``: the same for the link (both directions'
  bandwidths are multiplied).
- ``fleet.drift_fraction`` of the devices (drawn once from the seed) follow a Markov chain
  over the states ``normal`` (x1, x1) and ``fleet.drift_states`` (name -> ``[compute
  multiplier, link multiplier]``; by default ``background-load`` [0.5, 1.0] and
  ``congested-link`` [1.0, 0.25]). Every drifting device starts ``normal``; every
  ``fleet.drift_every`` rounds it keeps its state with probability ``fleet.drift_stay`` and
  otherwise moves to one of the other states, with equal odds.

A device's charged compute speed is ``profile x jitter x hidden compute x drift state's
compute``, its bandwidths ``profile x hidden link x drift state's link``; its class, memory
and availability stay the profile's. Everything is drawn from
``derive_seed(seed, "hidden", ...)`` streams, so it is the same for a seed in every process
and for every method compared on that seed. Per-device state is two float arrays and, for
the drifting devices, one small integer array per elapsed drift period (computed on demand
and cached), so fleets of thousands of devices stay cheap. With every knob at its default
(empty lists, ``drift_fraction = 0``) all multipliers are 1: the class-determined fleet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.core.seeding import derive_seed

__all__ = ["DEFAULT_DRIFT_STATES", "DRAWS", "HiddenSpec", "HiddenSpeeds"]

DRAWS = ("log-uniform", "choice")
DEFAULT_DRIFT_STATES = {"background-load": (0.5, 1.0), "congested-link": (1.0, 0.25)}


@dataclass(frozen=True)
class HiddenSpec:
    """The hidden-heterogeneity settings (``[fleet]`` keys of the same names, module doc)."""

    compute: tuple[float, ...] = ()
    compute_draw: str = "log-uniform"
    link: tuple[float, ...] = ()
    link_draw: str = "log-uniform"
    drift_fraction: float = 0.0
    drift_every: int = 0
    drift_stay: float = 0.5
    drift_states: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_DRIFT_STATES))

    @classmethod
    def from_config(cls, fleet: Any) -> HiddenSpec:
        """From a :class:`fedtune.core.config.FleetConfig` (validated there)."""
        return cls(compute=tuple(fleet.hidden_compute), compute_draw=fleet.hidden_compute_draw,
                   link=tuple(fleet.hidden_link), link_draw=fleet.hidden_link_draw,
                   drift_fraction=float(fleet.drift_fraction), drift_every=int(fleet.drift_every),
                   drift_stay=float(fleet.drift_stay),
                   drift_states={k: (float(v[0]), float(v[1])) for k, v in fleet.drift_states.items()})

    @property
    def active(self) -> bool:
        return bool(self.compute or self.link or self.drifts)

    @property
    def drifts(self) -> bool:
        return self.drift_fraction > 0 and self.drift_every > 0 and bool(self.drift_states)


def _draw(gen: np.random.Generator, values: tuple[float, ...], how: str, n: int) -> np.ndarray:
    if not values:
        return np.ones(n)
    if how == "choice":
        return np.asarray(values, dtype=float)[gen.integers(0, len(values), size=n)]
    lo, hi = math.log(values[0]), math.log(values[-1])
    return np.exp(gen.uniform(lo, hi, size=n))


class HiddenSpeeds:
    """The hidden multipliers of a fleet of ``num_devices`` devices for the run seeded ``seed``.

    Device ``d`` (client ``i`` has device ``i % num_devices``, as in the fleet's mix) computes at
    ``compute(d, round)`` times its class's speed and communicates at ``link(d, round)`` times
    its class's bandwidths. :meth:`multipliers` gives a whole round's at once."""

    def __init__(self, spec: HiddenSpec, seed: int, num_devices: int) -> None:
        if num_devices < 1:
            raise ValueError(f"a fleet needs at least one device, got {num_devices}")
        self.spec, self.seed, self.n = spec, int(seed), int(num_devices)
        self.compute_base = _draw(np.random.default_rng(derive_seed(seed, "hidden", "compute")), spec.compute,
                                  spec.compute_draw, self.n)
        self.link_base = _draw(np.random.default_rng(derive_seed(seed, "hidden", "link")), spec.link,
                               spec.link_draw, self.n)
        # state 0 is "normal"; states 1.. are drift_states in their order
        self.state_names = ["normal", *spec.drift_states]
        self.state_compute = np.array([1.0, *(v[0] for v in spec.drift_states.values())])
        self.state_link = np.array([1.0, *(v[1] for v in spec.drift_states.values())])
        self.drifting = np.zeros(0, dtype=np.int64)
        if spec.drifts:
            k = int(round(spec.drift_fraction * self.n))
            gen = np.random.default_rng(derive_seed(seed, "hidden", "drifting"))
            self.drifting = np.sort(gen.permutation(self.n)[:k])
        self._slot = np.full(self.n, -1, dtype=np.int64)  # device -> its index among the drifting ones
        self._slot[self.drifting] = np.arange(len(self.drifting))
        self._states: list[np.ndarray] = [np.zeros(len(self.drifting), dtype=np.int8)]  # per drift period

    @classmethod
    def from_config(cls, fleet: Any, seed: int, num_devices: int) -> HiddenSpeeds | None:
        """The fleet's hidden speeds, or ``None`` when every hidden knob is off."""
        spec = HiddenSpec.from_config(fleet)
        return cls(spec, seed, num_devices) if spec.active else None

    def period(self, server_round: int) -> int:
        """The drift period a round falls in: rounds 1..drift_every are period 0."""
        every = self.spec.drift_every
        return max(0, int(server_round) - 1) // every if every > 0 else 0

    def _period_states(self, period: int) -> np.ndarray:
        """The drifting devices' states in ``period`` (Markov chain from all-normal in period 0)."""
        k = len(self.spec.drift_states)
        while len(self._states) <= period:
            p = len(self._states)
            prev = self._states[-1]
            gen = np.random.default_rng(derive_seed(self.seed, "hidden", "drift", p))
            move = gen.random(len(prev)) >= self.spec.drift_stay
            # a move goes to one of the k other states with equal odds: shift by 1..k (mod k + 1)
            shift = gen.integers(1, k + 1, size=len(prev))
            self._states.append(np.where(move, (prev + shift) % (k + 1), prev).astype(np.int8))
        return self._states[period]

    def states(self, server_round: int) -> np.ndarray:
        """Every device's drift state index in ``server_round`` (0 = normal)."""
        out = np.zeros(self.n, dtype=np.int64)
        if len(self.drifting):
            out[self.drifting] = self._period_states(self.period(server_round))
        return out

    def state(self, device: int, server_round: int) -> str:
        d = int(device) % self.n
        slot = self._slot[d]
        if slot < 0:
            return "normal"
        return self.state_names[int(self._period_states(self.period(server_round))[slot])]

    def compute(self, device: int, server_round: int) -> float:
        d = int(device) % self.n
        slot = self._slot[d]
        mult = float(self.compute_base[d])
        if slot >= 0:
            mult *= float(self.state_compute[self._period_states(self.period(server_round))[slot]])
        return mult

    def link(self, device: int, server_round: int) -> float:
        d = int(device) % self.n
        slot = self._slot[d]
        mult = float(self.link_base[d])
        if slot >= 0:
            mult *= float(self.state_link[self._period_states(self.period(server_round))[slot]])
        return mult

    def multipliers(self, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """(compute, link) multipliers of every device in ``server_round``."""
        s = self.states(server_round)
        return self.compute_base * self.state_compute[s], self.link_base * self.state_link[s]
