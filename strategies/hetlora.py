"""HetLoRA: heterogeneous-rank LoRA by zero-padding and norm-weighted averaging.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024 (arXiv 2401.06432).

The global adapter lives at ``r_max``. A client of rank r receives the truncation
``A[:r]``, ``B[:, :r]``; its reply is zero-padded back to ``r_max``. Replies are averaged
with weights ``S_k = ||B_k A_k||_F`` normalised over the round's clients (per module),
so clients whose update moved the weights more count more. ``||B A||_F`` is computed
from the (r x r) Gram matrices, never the dense product. Under structured pruning each B
row (A column) is the norm-weighted mean over the clients that still hold it (the weights
renormalised per row/column). (The paper's local rank self-pruning is not included.)
"""

from __future__ import annotations

import torch

from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
    holder_weights,
    pad_factors,
)
from strategies.base import LoraStrategy


def product_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||B A||_F`` via ``trace((A A^T)(B^T B))``: (r, r) work only, in float64 (finite for any
    finite float32 factors, so the weights never fall back on NaN)."""
    a, b = a.double(), b.double()
    value = torch.sum((a @ a.T) * (b.T @ b)).clamp_min(0.0)
    return float(value.sqrt())


def aggregate_hetlora(updates: list[ClientUpdate], rank: int) -> Factors:
    """Zero-pad every client's factors to ``rank`` and average them with norm weights
    (per B row / A column over the clients that hold it; uniform when all norms are 0)."""
    out: Factors = {}
    for m in updates[0].factors:
        norms = [product_norm(*u.factors[m]) for u in updates]
        padded = [pad_factors(*u.factors[m], rank) for u in updates]
        out[m] = holder_weights(updates, m, norms).mean_factors(padded)
    return out


class HetLoRA(LoraStrategy):
    name = "hetlora"

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_hetlora(updates, self.global_rank)
