"""FFA-LoRA: federated LoRA with A frozen, only B trained and averaged.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(arXiv 2403.12313).

A is initialised once (seeded, shared by all clients) and never trained, so averaging
B alone is exact: ``sum_k p_k B_k A = (sum_k p_k B_k) A``. Heterogeneous ranks receive
``A[:r]`` and their B is zero-padded back to the global rank before averaging.
"""

from __future__ import annotations

from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter, pad_factors
from strategies.base import LoraStrategy


def aggregate_ffalora(updates: list[ClientUpdate], current: Factors) -> Factors:
    """Example-weighted average of zero-padded B; A is the current global (frozen) A."""
    total = float(sum(u.num_examples for u in updates))
    out: Factors = {}
    for m, (a_global, _) in current.items():
        rank = a_global.shape[0]
        b = sum((u.num_examples / total) * pad_factors(*u.factors[m], rank)[1] for u in updates)
        out[m] = (a_global, b)  # type: ignore[assignment]
    return out


class FFALoRA(LoraStrategy):
    name = "ffalora"
    trains_a = False

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_ffalora(updates, current.adapter)
