"""FlexLoRA: aggregate full-size updates, redistribute by truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024 (arXiv 2402.11505).

``delta_W = sum_k p_k B_k A_k`` (scale folded into B, ``p_k = n_k / sum n``); the global
adapter is its rank-``r_max`` truncated SVD, stored as ``B = U sqrt(S)``, ``A = sqrt(S) V^T``
with components sorted, so a client of rank r receives the best rank-r approximation by
plain truncation. The SVD is computed from QR factorisations of the stacked factors and
the SVD of a small (R x R) core (R = sum of client ranks), as NVFlare's heterogeneous
LoRA example does, never from the dense ``out x in`` matrix.
"""

from __future__ import annotations

from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter, lowrank_svd
from strategies.base import LoraStrategy


def aggregate_flexlora(updates: list[ClientUpdate], rank: int) -> Factors:
    total = float(sum(u.num_examples for u in updates))
    weights = [u.num_examples / total for u in updates]
    return {
        m: lowrank_svd([u.factors[m] for u in updates], weights, rank)
        for m in updates[0].factors
    }


class FlexLoRA(LoraStrategy):
    name = "flexlora"

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_flexlora(updates, self.global_rank)
