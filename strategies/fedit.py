"""FedIT: federated instruction tuning with LoRA, averaging A and B separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024 (arXiv 2305.05644).

``A = sum_k p_k A_k``, ``B = sum_k p_k B_k`` with ``p_k = n_k / sum n``. Defined for equal
ranks only. It is inexact: ``mean(B) mean(A) != mean(B A)`` in general.
"""

from __future__ import annotations

from typing import Any

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter
from strategies.base import LoraStrategy


def aggregate_fedit(updates: list[ClientUpdate]) -> Factors:
    """Example-weighted average of A and of B, module by module (equal ranks)."""
    ranks = {u.rank for u in updates}
    if len(ranks) != 1:
        raise ValueError(f"FedIT needs equal client ranks, got {sorted(ranks)}")
    total = float(sum(u.num_examples for u in updates))
    out: Factors = {}
    for m in updates[0].factors:
        a = sum(u.factors[m][0] * (u.num_examples / total) for u in updates)
        b = sum(u.factors[m][1] * (u.num_examples / total) for u in updates)
        out[m] = (a, b)  # type: ignore[assignment]
    return out


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
