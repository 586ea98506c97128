"""The simulated fleet clock: which clients are available, what a client-round costs on
its device, who runs out of memory or misses the deadline, and how long a round lasts.

A synchronous round lasts as long as its slowest surviving client, or the deadline when
stragglers were dropped. Costs follow :mod:`fedtune.fleet.cost` from the client's actual work
(steps and tokens it reports, its rank, its pruned shapes, the bytes really sent each
way). Randomness (availability, speed jitter) is seeded by ``(seed, round, client)``. With
hidden heterogeneity on (``fleet.hidden_*``, ``fleet.drift_*``; :mod:`fedtune.fleet.hidden`) a
device's charged seconds also carry its hidden compute and link multipliers; its class (the
``device`` of its records) stays the profile's. Only the server-side simulator reads device
profiles and hidden multipliers; policies see the outcomes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedtune.core.config import ExperimentConfig
from fedtune.core.protocol import ClientKey, Status
from fedtune.core.seeding import rng
from fedtune.fleet.cost import (
    ClientCost,
    ModelShape,
    client_round_cost,
    model_shape,
    peak_memory_bytes,
    train_flops,
)
from fedtune.fleet.devices import DeviceProfile, build_fleet, load_profiles
from fedtune.fleet.hidden import HiddenSpeeds
from fedtune.pruning.structure import LayerStructure, Masks

__all__ = ["Workload", "FleetSimulator", "FleetClock"]


@dataclass(frozen=True)
class Workload:
    """What one client-round runs, as the cost model needs it (from the experiment's config)."""

    seed: int  # the run's seed (availability and speed jitter draws)
    task: str  # "classification" or "causal-lm"
    num_labels: int
    batch_size: int
    max_length: int  # worst-case sequence length (memory prechecks)
    dtype: str  # compute dtype of the devices' peak throughput
    quantization: str  # "none" | "nf4" | "int8" | "auto" (the widest width that fits)
    quantization_by_device: dict[str, str] = field(default_factory=dict)  # device class -> width
    simulate_availability: bool = True

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Workload:
        return cls(seed=cfg.seed, task=cfg.model.task, num_labels=cfg.model.num_labels,
                   batch_size=cfg.train.batch_size, max_length=cfg.model.max_length, dtype=cfg.fleet.dtype,
                   quantization=cfg.model.quantization, quantization_by_device=dict(cfg.model.quantization_by_device),
                   simulate_availability=cfg.fleet.simulate_availability)


@dataclass
class FleetSimulator:
    work: Workload
    devices: list[DeviceProfile]
    model_config: Any
    structure: list[LayerStructure]
    embedding_params: int
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    declared: dict[int, DeviceProfile] = field(default_factory=dict)  # device classes nodes declared
    hidden: HiddenSpeeds | None = None  # hidden multipliers (None: the class-determined fleet)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, model: Any, structure: list[LayerStructure]) -> FleetSimulator:
        profiles = load_profiles(cfg.fleet.profiles or None)
        devices = build_fleet(cfg.fleet.devices, profiles)
        prunable = sum(o * i for shapes in model_shape(model.config, structure).layers for o, i in shapes.values())
        total = sum(p.numel() for p in model.parameters())
        hidden = HiddenSpeeds.from_config(cfg.fleet, cfg.seed, len(devices))
        return cls(Workload.from_config(cfg), devices, model.config, structure, total - prunable, profiles,
                   hidden=hidden)

    def declare(self, client_id: int, device: str) -> None:
        """A deployed node's own device class (its ``device`` node config) replaces the mix's."""
        if device not in self.profiles:
            raise ValueError(f"client {client_id} declares unknown device {device!r}"
                             f" (known: {', '.join(sorted(self.profiles))})")
        self.declared[client_id] = self.profiles[device]

    def device(self, client_id: int) -> DeviceProfile:
        if client_id in self.declared:
            return self.declared[client_id]
        return self.devices[client_id % len(self.devices)]

    def available(self, client_id: int, server_round: int) -> bool:
        if not self.work.simulate_availability:
            return True
        return rng(self.work.seed, "availability", server_round, client_id).random() < self.device(client_id).availability

    def speed_factor(self, client_id: int, server_round: int) -> float:
        """The client-round's compute speed multiplier: its profile's jitter times its hidden multipliers."""
        jitter = self.device(client_id).jitter
        factor = math.exp(rng(self.work.seed, "speed", server_round, client_id).gauss(0.0, jitter)) if jitter else 1.0
        if self.hidden is not None:
            factor *= self.hidden.compute(client_id, server_round)
        return factor

    def link_factor(self, client_id: int, server_round: int) -> float:
        """The client-round's bandwidth multiplier (1 without hidden heterogeneity)."""
        return self.hidden.link(client_id, server_round) if self.hidden is not None else 1.0

    # Costs assume LoRA on every prunable module (lora_modules=None): the conservative, largest estimate.

    def shape(self, masks: Masks | None) -> ModelShape:
        return model_shape(self.model_config, self.structure, masks, self.embedding_params)

    def peak_gb(self, shape: ModelShape, rank: int, batch: int, seq: int, quantization: str = "none") -> float:
        head = 0 if self.work.task != "classification" else shape.hidden * (self.work.num_labels + 1)
        return peak_memory_bytes(shape, batch, seq, rank, quantization, None, trainable_extra=head) / 1e9

    def quantization(self, client_id: int, rank: int, masks: Masks | None) -> str:
        """The client's base-weight width: its device class's setting, or with ``auto`` the widest
        (none, then int8, then nf4) whose predicted peak memory fits the device (FedPipe)."""
        w, dev = self.work, self.device(client_id)
        if dev.name in w.quantization_by_device:
            return w.quantization_by_device[dev.name]
        if w.quantization != "auto":
            return w.quantization
        shape = self.shape(masks)
        for width in ("none", "int8", "nf4"):
            if self.peak_gb(shape, rank, w.batch_size, w.max_length, width) <= dev.memory_gb:
                return width
        return "nf4"  # nothing fits: the narrowest, and the precheck reports the OOM

    def precheck(self, client_id: int, rank: int, masks: Masks | None) -> str | None:
        """The OOM reason for this configuration at the worst-case sequence length, else None."""
        dev = self.device(client_id)
        gb = self.peak_gb(self.shape(masks), rank, self.work.batch_size, self.work.max_length,
                          self.quantization(client_id, rank, masks))
        if gb > dev.memory_gb:
            return f"out of memory on {dev.name}: needs {gb:.2f} GB, has {dev.memory_gb:.2f} GB"
        return None

    def cost(self, client_id: int, server_round: int, *, rank: int, masks: Masks | None, steps: int,
             tokens: int, bytes_down: int, bytes_up: int,
             segments: list[tuple[int, Masks | None]] | None = None) -> ClientCost:
        """One client-round's cost. ``segments`` (``[(steps, masks in force), ...]``, from the
        client's pruning steps) charge each local step at the model it ran; without them every
        step is charged at ``masks``. Peak memory is the largest segment's (the first: masks only grow)."""
        batch = self.work.batch_size
        seq = max(1, round(tokens / max(steps * batch, 1)))
        causal = self.work.task != "classification"
        parts = segments if segments else [(steps, masks)]
        flops = sum(n * train_flops(self.shape(m), batch, seq, rank, None, causal_lm=causal) for n, m in parts)
        peak = max(self.peak_gb(self.shape(m), rank, batch, seq, self.quantization(client_id, rank, m)) for _, m in parts)
        return client_round_cost(self.device(client_id), flops_per_step=flops / max(steps, 1), steps=max(steps, 1),
                                 bytes_down=bytes_down, bytes_up=bytes_up, peak_bytes=peak * 1e9,
                                 dtype=self.work.dtype, speed_factor=self.speed_factor(client_id, server_round),
                                 link_factor=self.link_factor(client_id, server_round))


@dataclass
class FleetClock:
    """The simulated clock of synchronous rounds: charges each client-round its cost on its device
    and advances by the round's length (its slowest survivor, or the deadline when a client was
    dropped for missing it)."""

    fleet: FleetSimulator
    deadline_s: float = 0.0  # 0 = no deadline
    sim_time_s: float = 0.0  # cumulative simulated seconds
    round_sim_s: dict[int, float] = field(default_factory=dict)

    def charge(self, client_id: int, server_round: int, *, rank: int, masks: Masks | None, steps: int, tokens: int,
               bytes_down: int, bytes_up: int, segments: list[tuple[int, Masks | None]] | None = None,
               ) -> tuple[dict[str, Any], str | None, str | None]:
        """The client-round's cost fields for its record, and (status, reason) when it ran out of
        memory (failed) or missed the deadline (dropped); (None, None) when it survives. Each local
        step is charged at the masks in force during it (``segments``) when the client reports them."""
        cost = self.fleet.cost(client_id, server_round, rank=rank, masks=masks, steps=steps, tokens=tokens,
                               bytes_down=bytes_down, bytes_up=bytes_up, segments=segments)
        device = self.fleet.device(client_id).name
        fields = {ClientKey.DEVICE: device, ClientKey.SIM_SECONDS: round(cost.total_s, 3),
                  ClientKey.SIM_COMPUTE_S: round(cost.compute_s, 3), ClientKey.SIM_COMM_S: round(cost.comm_s, 3),
                  ClientKey.PEAK_MEM_GB: round(cost.peak_mem_gb, 3), ClientKey.FLOPS: cost.flops,
                  ClientKey.COMM_BYTES: bytes_down + bytes_up}
        if cost.oom:
            return fields, Status.FAILED, f"out of memory on {device}: needs {cost.peak_mem_gb:.2f} GB"
        if self.deadline_s and cost.total_s > self.deadline_s:
            return fields, Status.DROPPED, f"missed the deadline: {cost.total_s:.1f}s > {self.deadline_s:.1f}s"
        return fields, None, None

    def advance(self, server_round: int, records: list[dict[str, Any]]) -> float:
        """End a round: its length from the client records; returns it."""
        survivors = [r[ClientKey.SIM_SECONDS] for r in records
                     if r[ClientKey.STATUS] == Status.OK and ClientKey.SIM_SECONDS in r]
        length = max(survivors, default=0.0)
        if self.deadline_s and any(r[ClientKey.STATUS] == Status.DROPPED for r in records):
            length = self.deadline_s
        self.round_sim_s[server_round] = length
        self.sim_time_s += length
        return length
