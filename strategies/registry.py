"""Registry of aggregation strategies: explicit, lowercase, loud on unknown or duplicate names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.core.plugins import load_plugin
from fedtune.fleet.clock import FleetSimulator
from fedtune.pruning.structure import LayerStructure
from strategies.base import LoraStrategy
from strategies.fedit import FedIT
from strategies.fedspine import FedSpine
from strategies.ffalora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.geomedian import GeometricMedian
from strategies.hetlora import HetLoRA
from strategies.trimmed_mean import TrimmedMean

__all__ = ["STRATEGIES", "register_strategy", "strategy_class", "build_strategy"]

STRATEGIES: dict[str, type[LoraStrategy]] = {}


def register_strategy(name: str, cls: type[LoraStrategy]) -> type[LoraStrategy]:
    key = name.lower()
    if key != name:
        raise ValueError(f"strategy names are lowercase: {name!r}")
    if key in STRATEGIES:
        raise ValueError(f"strategy {name!r} is already registered ({STRATEGIES[key].__name__})")
    STRATEGIES[key] = cls
    return cls


for _cls in (FedIT, HetLoRA, FlexLoRA, FLoRA, FFALoRA, FedSpine, TrimmedMean, GeometricMedian):
    register_strategy(_cls.name, _cls)


def strategy_class(spec: str) -> type[LoraStrategy]:
    """A registry name, ``module:Class`` or ``path/to/file.py:Class``."""
    return load_plugin(spec, STRATEGIES, LoraStrategy, "federation.strategy")


def build_strategy(experiment: ExperimentConfig, *, structure: list[LayerStructure] | None = None,
                   fleet: FleetSimulator | None = None,
                   partition_size: Callable[[int], int] | None = None) -> LoraStrategy:
    """The configured strategy with its collaborators: the model's prunable ``structure``, the
    simulated ``fleet`` and the size of each client's assigned partition (each None when not used)."""
    cls = strategy_class(experiment.federation.strategy)
    args: dict[str, Any] = dict(experiment.federation.strategy_args)
    try:
        return cls(experiment, structure=structure, fleet=fleet, partition_size=partition_size, **args)
    except TypeError as exc:
        raise ConfigError(f"federation.strategy_args: {cls.__name__} rejected {sorted(args)}: {exc}") from exc
