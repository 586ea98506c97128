"""Device profiles (data, user-extensible) and fleets built from them.

A profile gives peak throughput per dtype, memory, uplink/downlink bandwidth, the
probability of taking part in a round and a speed jitter. The built-in profiles live in
``fedtune/devices.toml`` with their sources; a user file of the same shape adds or
overrides devices. A fleet is a mix such as ``{jetson-tx2 = 30, jetson-xavier-nx = 40,
jetson-agx-xavier = 10}`` (FedSpine's testbed, :data:`FEDSPINE_FLEET`). Only the
simulator reads profiles: bandit policies see outcomes, never these numbers.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.config import ConfigError, read_toml

__all__ = ["DeviceProfile", "BUILTIN_PROFILES_FILE", "load_profiles", "build_fleet", "FEDSPINE_FLEET"]


BUILTIN_PROFILES_FILE = Path(__file__).with_name("devices.toml")


FEDSPINE_FLEET = {"jetson-tx2": 30, "jetson-xavier-nx": 40, "jetson-agx-xavier": 10}


_KEYS = {"tflops", "memory_gb", "uplink_mbps", "downlink_mbps", "availability", "jitter", "efficiency", "source"}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    tflops: dict[str, float]  # nominal dense peak per dtype (fp32, fp16, int8 in TOPS)
    memory_gb: float  # memory usable for training (unified memory on Jetsons)
    uplink_mbps: float
    downlink_mbps: float
    availability: float = 1.0  # probability of taking part in a round
    jitter: float = 0.0  # std of the log of a per-round speed factor
    efficiency: float = 0.35  # fraction of peak that training reaches
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"device {self.name!r}"
        if not self.tflops or any(not (isinstance(v, (int, float)) and v > 0) for v in self.tflops.values()):
            raise ConfigError(f"{where}: tflops must map dtypes to positive numbers, got {self.tflops}")
        for key in ("memory_gb", "uplink_mbps", "downlink_mbps", "efficiency"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
        if not 0.0 < self.availability <= 1.0:
            raise ConfigError(f"{where}: availability must be in (0, 1], got {self.availability}")
        if self.jitter < 0:
            raise ConfigError(f"{where}: jitter must be >= 0, got {self.jitter}")

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``, falling back to the widest dtype the profile lists."""
        for key in (dtype, "fp16", "fp32"):
            if key in self.tflops:
                return self.tflops[key] * 1e12
        return next(iter(self.tflops.values())) * 1e12


def _parse(table: dict[str, Any], source: str) -> dict[str, DeviceProfile]:
    devices = table.get("devices")
    if not isinstance(devices, dict):
        raise ConfigError(f"{source}: expected a [devices.<name>] table per device")
    out = {}
    for name, spec in devices.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: device {name!r} must be a table")
        unknown = set(spec) - _KEYS
        if unknown:
            raise ConfigError(f"{source}: device {name!r}: unknown key {sorted(unknown)[0]!r}")
        missing = {"tflops", "memory_gb", "uplink_mbps", "downlink_mbps"} - set(spec)
        if missing:
            raise ConfigError(f"{source}: device {name!r}: missing key {sorted(missing)[0]!r}")
        out[name] = DeviceProfile(name=name, **spec)
    return out


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Built-in profiles, updated by the devices of ``path`` (if given)."""
    profiles = _parse(tomllib.loads(BUILTIN_PROFILES_FILE.read_text()), str(BUILTIN_PROFILES_FILE))
    if path is not None:
        profiles.update(_parse(read_toml(path, "fleet.profiles: file"), str(path)))
    return profiles


def build_fleet(mix: dict[str, int], profiles: dict[str, DeviceProfile]) -> list[DeviceProfile]:
    """Client i's device: the mix expanded in its order (30 TX2, then 40 NX, ...)."""
    fleet: list[DeviceProfile] = []
    for name, count in mix.items():
        if name not in profiles:
            raise ConfigError(f"fleet.devices: unknown device {name!r} (known: {', '.join(sorted(profiles))})")
        if not isinstance(count, int) or count < 0:
            raise ConfigError(f"fleet.devices.{name}: count must be a non-negative integer, got {count!r}")
        fleet += [profiles[name]] * count
    if not fleet:
        raise ConfigError("fleet.devices: the fleet is empty")
    return fleet
