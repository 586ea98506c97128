"""FedIT: federated instruction tuning with LoRA, averaging A and B separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024 (arXiv 2305.05644).

``A = sum_k p_k A_k``, ``B = sum_k p_k B_k`` with ``p_k = n_k / sum n``. Defined for equal
ranks only. It is inexact: ``mean(B) mean(A) != mean(B A)`` in general. Under pruning, each
B row (A column) is the example-weighted mean over the clients that still hold it.
"""

from __future__ import annotations

from typing import Any

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter, holder_weights
from strategies.base import LoraStrategy


def aggregate_fedit(updates: list[ClientUpdate]) -> Factors:
    """Example-weighted average of A and of B, module by module (equal ranks), each B row and
    A column over the clients that hold it."""
    ranks = {u.rank for u in updates}
    if len(ranks) != 1:
        raise ValueError(f"FedIT needs equal client ranks, got {sorted(ranks)}")
    weights = [float(u.num_examples) for u in updates]
    return {m: holder_weights(updates, m, weights).mean_factors([u.factors[m] for u in updates])
            for m in updates[0].factors}


class FedIT(LoraStrategy):
    name = "fedit"

    def __init__(self, experiment: ExperimentConfig, **options: Any) -> None:
        ranks = {experiment.lora.rank_for(c) for c in range(experiment.federation.num_clients)}
        if len(ranks) != 1:
            raise ConfigError(
                f"federation.strategy: 'fedit' averages A and B separately and needs equal ranks;"
                f" lora.ranks gives {sorted(ranks)} (use hetlora, flexlora or flora)"
            )
        super().__init__(experiment, **options)

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_fedit(updates)
