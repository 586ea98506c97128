"""FLoRA: exact heterogeneous-rank aggregation by stacking.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024 (arXiv 2409.05976).

Stacking ``A_s = [A_1; ...; A_K]`` and ``B_s = [p_1 B_1, ..., p_K B_K]`` gives
``B_s A_s = sum_k p_k B_k A_k`` exactly (no cross terms, unlike FedIT). The stacked
update is merged into the model: fedtune keeps it as the *frozen* low-rank part of the
global state (clients add it as a frozen path, so quantized bases work too), and every
client starts the next round from a fresh adapter (A random, seeded by round; B = 0).
When the frozen rank exceeds ``max_frozen_rank`` it is re-compressed by the QR/SVD of
:func:`fedtune.lora.factors.lowrank_svd` (exact while the true rank fits; the best
approximation otherwise). Under structured pruning each row (column) of the stacked update
is the example-weighted mean over the clients that still hold it (renormalised weights on
B's rows or A's columns).
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.core.seeding import torch_generator
from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
    holder_weights,
    init_factors,
    lowrank_svd,
    stack_factors,
)
from strategies.base import LoraStrategy, weighted_head_average


def aggregate_flora(updates: list[ClientUpdate]) -> Factors:
    """Stack every client's factors with weights ``p_k = n_k / sum n`` (per row/column renormalised
    over the clients that hold it, under pruning)."""
    weights = [float(u.num_examples) for u in updates]
    out: Factors = {}
    for m in updates[0].factors:
        parts = holder_weights(updates, m, weights).product_parts([u.factors[m] for u in updates])
        out[m] = stack_factors(parts, [1.0] * len(parts))
    return out


def merge_frozen(frozen: Factors, stacked: Factors, max_rank: int) -> Factors:
    """``frozen + stacked`` as concatenated factors, re-compressed above ``max_rank``."""
    out: Factors = {}
    for m, (a_s, b_s) in stacked.items():
        if m in frozen:
            a_f, b_f = frozen[m]
            a, b = torch.cat([a_f, a_s], 0), torch.cat([b_f, b_s], 1)
        else:
            a, b = a_s, b_s
        if a.shape[0] > max_rank:
            a, b = lowrank_svd([(a, b)], [1.0], max_rank)
        out[m] = (a, b)
    return out


class FLoRA(LoraStrategy):
    name = "flora"

    def __init__(self, experiment: ExperimentConfig, *, max_frozen_rank: int = 256, **options: Any) -> None:
        if max_frozen_rank < 1:
            raise ConfigError(f"federation.strategy_args.max_frozen_rank: must be >= 1, got {max_frozen_rank}")
        self.max_frozen_rank = int(max_frozen_rank)
        super().__init__(experiment, **options)

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_flora(updates)

    def aggregate(self, updates: list[ClientUpdate], current: GlobalAdapter) -> GlobalAdapter:
        frozen = merge_frozen(current.frozen, self.aggregate_adapters(updates, current), self.max_frozen_rank)
        shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b) in current.adapter.items()}
        gen = torch_generator(self.experiment.seed, "flora", self.server_round)  # the same after a resume
        fresh = init_factors(shapes, self.global_rank, gen)
        return GlobalAdapter(adapter=fresh, frozen=frozen, head=weighted_head_average(updates) or current.head)
