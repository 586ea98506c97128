"""Geometric median of heterogeneous-rank LoRA updates, in factor space (robust aggregation).

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on
Signal Processing 70, 2022 (arXiv 1912.13445): RFA, the smoothed Weiszfeld algorithm.

Each client's model is the point ``x_k = (B_k A_k, head_k)`` (its adapter's product, every
module, and its task head). The geometric median ``z = argmin sum_k ||z - x_k||`` is a convex
combination ``z = sum_k beta_k x_k``, so Weiszfeld's iteration ``beta_k ~ 1 / max(nu, ||z - x_k||)``
needs only the clients' pairwise inner products ``<B_j A_j, B_l A_l>_F = sum((B_j^T B_l) *
(A_j A_l^T))``, an (r_j x r_l) computation: the dense ``out x in`` matrices are never formed.
The new adapter is the rank-``r_max`` truncated SVD of ``sum_k beta_k B_k A_k`` computed from
the factors (as FlexLoRA does; under pruning each row/column over its holders), the head is
``sum_k beta_k head_k``. Clients count equally (their claimed ``num_examples`` cannot buy
influence). The median is unmoved by any single client once the others agree: its breakdown
point is one half.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
)
from strategies.base import LoraStrategy
from strategies.flexlora import aggregate_flexlora

__all__ = ["GeometricMedian", "weiszfeld_weights", "gram_matrix", "aggregate_geomedian"]


def gram_matrix(updates: list[ClientUpdate]) -> torch.Tensor:
    """(K, K) float64 inner products of the clients' points (adapter products of every module, and heads)."""
    k = len(updates)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for m in updates[0].factors:
        facs = [(a.double(), b.double()) for a, b in (u.factors[m] for u in updates)]
        for i in range(k):
            a_i, b_i = facs[i]
            for j in range(i, k):
                a_j, b_j = facs[j]
                v = torch.sum((b_i.T @ b_j) * (a_i @ a_j.T))
                gram[i, j] += v
                if i != j:
                    gram[j, i] += v
    for name in updates[0].head:
        heads = torch.stack([u.head[name].double().reshape(-1) for u in updates])
        gram += heads @ heads.T
    return gram


def weiszfeld_weights(gram: torch.Tensor, iterations: int = 300, tol: float = 1e-10,
                      nu: float = 1e-6) -> torch.Tensor:
    """Smoothed Weiszfeld (RFA) on points known through their Gram matrix: the convex weights
    ``beta`` of the geometric median ``sum_k beta_k x_k``. It stops when the median moves less than
    ``tol`` times a typical point's norm (measured through the Gram matrix, so a far outlier's
    vanishing weight is followed until its pull is negligible) or after ``iterations``."""
    k = gram.shape[0]
    beta = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = float(gram.diagonal().clamp_min(0).sqrt().median()) or 1.0  # a typical point's norm, not the largest
    floor = nu * scale
    eye = torch.eye(k, dtype=torch.float64)
    for _ in range(iterations):
        diff = beta[None, :] - eye  # row k: z - x_k in the basis of the points
        dist = torch.einsum("ki,ij,kj->k", diff, gram, diff).clamp_min(0.0).sqrt()
        w = 1.0 / dist.clamp_min(floor)
        new = w / w.sum()
        step = new - beta  # how far z moved, in the points' own metric (a far point's tiny weight still counts)
        beta = new
        if float(torch.einsum("i,ij,j->", step, gram, step).clamp_min(0.0).sqrt()) < tol * scale:
            break
    return beta


def aggregate_geomedian(updates: list[ClientUpdate], rank: int, beta: torch.Tensor) -> Factors:
    """The rank-``rank`` SVD of ``sum_k beta_k B_k A_k`` (per row/column over its holders)."""
    return aggregate_flexlora(updates, rank, [float(x) for x in beta])


class GeometricMedian(LoraStrategy):
    """RFA's geometric median of the clients' adapter products and heads; ``iterations`` (strategy_args)."""

    name = "geomedian"

    def __init__(self, experiment: ExperimentConfig, *, iterations: int = 300, **options: Any) -> None:
        if int(iterations) < 1:
            raise ConfigError(f"federation.strategy_args.iterations: must be >= 1, got {iterations}")
        self.iterations = int(iterations)
        self.last_weights: list[float] = []  # the median's convex weights of the last round, by client id order
        super().__init__(experiment, **options)

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return self.aggregate(updates, current).adapter

    def aggregate(self, updates: list[ClientUpdate], current: GlobalAdapter) -> GlobalAdapter:
        beta = weiszfeld_weights(gram_matrix(updates), self.iterations)
        self.last_weights = [float(x) for x in beta]
        head = {k: sum(float(b) * u.head[k].double() for b, u in zip(beta, updates)).to(t.dtype)  # type: ignore[union-attr]
                for k, t in (updates[0].head or {}).items()}
        return GlobalAdapter(adapter=aggregate_geomedian(updates, self.global_rank, beta), frozen=current.frozen,
                             head=head or current.head)
