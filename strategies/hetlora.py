"""HetLoRA: heterogeneous-rank LoRA by zero-padding and norm-weighted averaging.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024 (arXiv 2401.06432).

The global adapter lives at ``r_max``. A client of rank r receives the truncation
``A[:r]``, ``B[:, :r]``; its reply is zero-padded back to ``r_max``. Replies are averaged
with weights ``S_k = ||B_k A_k||_F`` normalised over the round's clients (per module),
so clients whose update moved the weights more count more. ``||B A||_F`` is computed
from the (r x r) Gram matrices, never the dense product. (The paper's local rank
self-pruning is not included.)
"""

from __future__ import annotations

import torch

from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter, pad_factors
from strategies.base import LoraStrategy


def product_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||B A||_F`` via ``trace((A A^T)(B^T B))``: (r, r) work only."""
    value = torch.sum((a @ a.T) * (b.T @ b)).clamp_min(0.0)
    return float(value.sqrt())


def aggregate_hetlora(updates: list[ClientUpdate], rank: int) -> Factors:
    """Zero-pad every client's factors to ``rank`` and average them with norm weights."""
    out: Factors = {}
    for m in updates[0].factors:
        norms = [product_norm(*u.factors[m]) for u in updates]
        total = sum(norms)
        weights = [n / total for n in norms] if total > 0 else [1.0 / len(updates)] * len(updates)
        padded = [pad_factors(*u.factors[m], rank) for u in updates]
        a = sum(w * pa for w, (pa, _) in zip(weights, padded))
        b = sum(w * pb for w, (_, pb) in zip(weights, padded))
        out[m] = (a, b)  # type: ignore[assignment]
    return out


class HetLoRA(LoraStrategy):
    name = "hetlora"

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_hetlora(updates, self.global_rank)
