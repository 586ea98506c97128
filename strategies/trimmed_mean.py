"""Coordinate-wise trimmed mean of heterogeneous-rank LoRA factors (Byzantine-robust averaging).

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (arXiv 1803.01498).

Factors are aligned as in HetLoRA: a client of rank r trained the first r components of the
global adapter. For every coordinate of ``A`` (r_max, in) and ``B`` (out, r_max), the holders
are the clients whose rank covers its component and who did not prune its row (B) or column
(A); the largest and the smallest ``floor(trim * holders)`` values are dropped and the rest are
averaged (unweighted: a client's claimed ``num_examples`` cannot buy influence). A coordinate
that no client holds keeps the global adapter's value. The task head is trimmed the same way.
With ``trim = 0.2`` a coordinate stays within the honest values' range while fewer than 20% of
its holders are adversarial.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
    pad_factors,
    truncate_factors,
)
from strategies.base import LoraStrategy

__all__ = ["TrimmedMean", "trimmed_mean", "aggregate_trimmed"]


def trimmed_mean(values: torch.Tensor, held: torch.Tensor, trim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate of ``values`` (K, ...), the mean over the held entries after dropping the
    ``floor(trim * holders)`` largest and smallest (at least one entry stays). Returns the means
    (float64; 0 where nothing is held) and the mask of coordinates held by anyone."""
    x = torch.where(held, values.double(), torch.full_like(values, math.nan, dtype=torch.float64))
    ordered, _ = torch.sort(x, dim=0)  # NaN (not held) sorts last
    count = held.sum(0)
    cut = torch.minimum(torch.floor(trim * count.double()).long(), torch.div(count - 1, 2, rounding_mode="floor"))
    cut = cut.clamp_min(0)
    idx = torch.arange(values.shape[0]).view(-1, *([1] * (values.dim() - 1)))
    keep = (idx >= cut) & (idx < count - cut)
    total = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(0)
    return total / keep.sum(0).clamp_min(1), count > 0


def _held(u: ClientUpdate, module: str, rank: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which coordinates of the zero-padded (A, B) the client holds: its rank's components, minus
    the rows (B) or columns (A) it pruned."""
    r = u.rank
    held_a = torch.zeros(rank, a.shape[1], dtype=torch.bool)
    held_b = torch.zeros(b.shape[0], rank, dtype=torch.bool)
    held_a[:r], held_b[:, :r] = True, True
    if module in u.keep:
        how, vec = u.keep[module]
        vec = vec.reshape(-1).bool()
        if how == "rows":
            held_b &= vec[:, None]
        else:
            held_a &= vec[None, :]
    return held_a, held_b


def aggregate_trimmed(updates: list[ClientUpdate], current: Factors, rank: int, trim: float) -> Factors:
    """The trimmed-mean adapter at ``rank``; coordinates nobody holds keep ``current``'s values."""
    out: Factors = {}
    for m in updates[0].factors:
        padded = [pad_factors(*u.factors[m], rank) for u in updates]
        holds = [_held(u, m, rank, a, b) for u, (a, b) in zip(updates, padded)]
        a_mean, a_any = trimmed_mean(torch.stack([a for a, _ in padded]), torch.stack([h for h, _ in holds]), trim)
        b_mean, b_any = trimmed_mean(torch.stack([b for _, b in padded]), torch.stack([h for _, h in holds]), trim)
        a0, b0 = truncate_factors(*current[m], rank) if m in current else (torch.zeros_like(a_mean),
                                                                           torch.zeros_like(b_mean))
        dtype = padded[0][0].dtype
        out[m] = (torch.where(a_any, a_mean, a0.double()).to(dtype), torch.where(b_any, b_mean, b0.double()).to(dtype))
    return out


class TrimmedMean(LoraStrategy):
    """Coordinate-wise trimmed mean of the factors and the head; ``trim`` (strategy_args) in [0, 0.5)."""

    name = "trimmed-mean"

    def __init__(self, experiment: ExperimentConfig, *, trim: float = 0.2, **options: Any) -> None:
        if not 0.0 <= float(trim) < 0.5:
            raise ConfigError(f"federation.strategy_args.trim: must be in [0, 0.5), got {trim}")
        self.trim = float(trim)
        super().__init__(experiment, **options)

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        return aggregate_trimmed(updates, current.adapter, self.global_rank, self.trim)

    def aggregate(self, updates: list[ClientUpdate], current: GlobalAdapter) -> GlobalAdapter:
        head = {}
        for k, t in (updates[0].head or {}).items():
            stacked = torch.stack([u.head[k] for u in updates])
            mean, _ = trimmed_mean(stacked, torch.ones_like(stacked, dtype=torch.bool), self.trim)
            head[k] = mean.to(t.dtype)
        return GlobalAdapter(adapter=self.aggregate_adapters(updates, current), frozen=current.frozen,
                             head=head or current.head)
