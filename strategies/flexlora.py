"""FlexLoRA: aggregate full-size updates, redistribute by truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024 (arXiv 2402.11505).

``delta_W = sum_k p_k B_k A_k`` (scale folded into B, ``p_k = n_k / sum n``); the global
adapter is its rank-``r_max`` truncated SVD, stored as ``B = U sqrt(S)``, ``A = sqrt(S) V^T``
with components sorted, so a client of rank r receives the best rank-r approximation by
plain truncation. The SVD is computed from QR factorisations of the stacked factors and
the SVD of a small (R x R) core (R = sum of client ranks), as NVFlare's heterogeneous
LoRA example does, never from the dense ``out x in`` matrix. Under structured pruning
each row (column) of ``delta_W`` is the example-weighted mean over the clients that still
hold it: the renormalised weights go onto B's rows (A's columns) before the QR.
"""

from __future__ import annotations

from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
    holder_weights,
    lowrank_svd,
)
from strategies.base import LoraStrategy


def aggregate_flexlora(updates: list[ClientUpdate], rank: int, weights: list[float] | None = None) -> Factors:
    """Rank-``rank`` SVD of the weighted (per row/column: holder-renormalised) sum of products;
    the weights are the clients' example counts unless given."""
    weights = [float(u.num_examples) for u in updates] if weights is None else [float(w) for w in weights]
    out: Factors = {}
    for m in updates[0].factors:
        parts = holder_weights(updates, m, weights).product_parts([u.factors[m] for u in updates])
        out[m] = lowrank_svd(parts, [1.0] * len(parts), rank)
    return out


class FlexLoRA(LoraStrategy):
    name = "flexlora"

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_flexlora(updates, self.global_rank)
