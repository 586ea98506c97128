"""Flower strategies that aggregate LoRA adapters: one rule per module, and the registry."""

from strategies.base import LoraStrategy, weighted_head_average
from strategies.fedit import FedIT
from strategies.fedspine import FedSpine
from strategies.ffalora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.geomedian import GeometricMedian
from strategies.hetlora import HetLoRA
from strategies.registry import (
    STRATEGIES,
    build_strategy,
    register_strategy,
    strategy_class,
)
from strategies.trimmed_mean import TrimmedMean

__all__ = [
    "LoraStrategy", "weighted_head_average", "FedIT", "HetLoRA", "FlexLoRA", "FLoRA", "FFALoRA", "FedSpine",
    "TrimmedMean", "GeometricMedian",
    "STRATEGIES", "register_strategy", "strategy_class", "build_strategy",
]
