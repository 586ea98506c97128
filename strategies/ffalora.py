"""FFA-LoRA: federated LoRA with A frozen, only B trained and averaged.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(arXiv 2403.12313).

A is initialised once (seeded, shared by all clients) and never trained, so averaging
B alone is exact: ``sum_k p_k B_k A = (sum_k p_k B_k) A``. Heterogeneous ranks receive
``A[:r]`` and their B is zero-padded back to the global rank before averaging.

Under structured pruning every coordinate of ``delta_W`` should be the example-weighted mean
over the clients that still hold it. For pruned B rows that is exact: each row of B is
averaged over its holders. For pruned A columns the weights vary along the columns of
``delta_W``, which a single B over the fixed A cannot express in general; B is then the
least-squares fit ``argmin_B ||B A - D||_F`` of that holder mean ``D = sum_k B_k A Q_k``
(``Q_k`` the diagonal of client k's per-column weights):
``B = sum_k B_k (A Q_k A^T) (A A^T)^+``, computed from (r x r) matrices, never ``D``. It is
``D`` projected onto the row space of A, and equals the plain mean when nobody pruned.
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


def aggregate_ffalora(updates: list[ClientUpdate], current: Factors) -> Factors:
    """Example-weighted average of zero-padded B over the holders; A is the current global (frozen) A."""
    weights = [float(u.num_examples) for u in updates]
    out: Factors = {}
    for m, (a_global, _) in current.items():
        rank = a_global.shape[0]
        bs = [pad_factors(*u.factors[m], rank)[1] for u in updates]
        hw = holder_weights(updates, m, weights)
        if hw.axis == "cols":
            a = a_global.double()
            core = sum(b.double() @ ((a * q[None, :]) @ a.T) for b, q in zip(bs, hw.coords))  # (out, r)
            b_new = (core @ torch.linalg.pinv(a @ a.T, hermitian=True)).to(bs[0].dtype)
        else:
            b_new = sum(hw.b_weight(k, b) * b for k, b in enumerate(bs))
        out[m] = (a_global, b_new)  # type: ignore[assignment]
    return out


class FFALoRA(LoraStrategy):
    name = "ffalora"
    trains_a = False

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_ffalora(updates, current.adapter)
