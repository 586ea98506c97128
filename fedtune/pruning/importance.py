"""LoRAPrune importance and the pruning schedule.

LoRAPrune (Zhang et al., arXiv 2305.18403), as used by FedSpine (arXiv 2501.02438): the importance
of a frozen weight ``W`` with adapter ``s B A`` is ``|G * (W + s B A)|`` (elementwise), where
``G = (dL/dB) A + B (dL/dA) - (dL/dB)(dL/dA)`` approximates ``dL/dW`` from the adapter's gradients
only. Scores are summed over structure groups (:mod:`fedtune.pruning.structure`), normalised per
module (L2 norm, as in the reference implementation), smoothed by an EMA that starts from zero, and
the lowest groups are pruned toward the target on a cubic schedule.
"""

from __future__ import annotations

import math

import torch

from fedtune.pruning.masks import Masks
from fedtune.pruning.structure import LayerStructure

__all__ = ["cubic_ratio", "unit_scores", "normalise", "prune_step", "units_to_prune"]





def cubic_ratio(target: float, start: float, step: int, total_steps: int) -> float:
    """Cubic schedule (Zhu & Gupta 2017): ``target - (target - start) (1 - t/T)^3``."""
    if total_steps <= 0:
        return target
    t = min(max(step / total_steps, 0.0), 1.0)
    return target - (target - start) * (1.0 - t) ** 3


def lora_weight_gradient(a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """LoRAPrune's estimate of dL/dW from adapter gradients: ``gB A + B gA - gB gA`` (scaled).

    a, ga: (r, in); b, gb: (out, r); returns (out, in).
    """
    return scale * (gb @ a + b @ ga - gb @ ga)


def _reduce(score: torch.Tensor, how: str, per_unit: int) -> torch.Tensor:
    """(out, in) scores -> per-unit totals over rows ("rows") or columns ("cols")."""
    vec = score.sum(dim=1) if how == "rows" else score.sum(dim=0)
    return vec.view(-1, per_unit).sum(dim=1)


def normalise(v: torch.Tensor) -> torch.Tensor:
    """Per-module normalisation as in LoRAPrune: divide the module's group scores by their L2 norm
    (plus 1e-8, so an all-zero module stays zero)."""
    return v / (torch.linalg.vector_norm(v) + 1e-8)


def unit_scores(structure: list[LayerStructure], weights: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Per-unit importance from per-weight importance matrices ``weights[module] (out, in)``.

    Each module's unit totals are divided by their L2 norm (:func:`normalise`), then summed over
    the group's modules. Modules missing from ``weights`` contribute nothing.
    """
    out: dict[int, dict[str, torch.Tensor]] = {}
    for ls in structure:
        attn = torch.zeros(ls.num_units)
        for name in ls.attn_in:
            if name in weights:
                attn += normalise(_reduce(weights[name], "rows", ls.attn_rows[name]))
        if ls.attn_out in weights:
            attn += normalise(_reduce(weights[ls.attn_out], "cols", ls.out_cols_per_unit))
        ffn = torch.zeros(ls.ffn_dim)
        for name in ls.ffn_in:
            if name in weights:
                ffn += normalise(_reduce(weights[name], "rows", 1))
        if ls.ffn_out in weights:
            ffn += normalise(_reduce(weights[ls.ffn_out], "cols", 1))
        out[ls.layer] = {"attn": attn, "ffn": ffn}
    return out


def units_to_prune(ratio: float, n: int) -> int:
    """How many of ``n`` units a layer has pruned at ``ratio``: ``floor(ratio * n)``, at least one kept."""
    return min(int(math.floor(ratio * n + 1e-9)), n - 1)


def prune_step(masks: Masks, scores: dict[int, dict[str, torch.Tensor]], ratio: float,
               skip_layers: frozenset[int] | set[int] = frozenset()) -> Masks:
    """Prune each layer's lowest-scoring kept units until ``ratio`` of them are pruned.

    Per layer and per kind, ``floor(ratio * n)`` units end up pruned (at least one kept);
    already pruned units stay pruned (masks only grow); ``skip_layers`` are left whole.
    """
    new: Masks = {}
    for layer, m in masks.items():
        if layer in skip_layers:
            new[layer] = {k: t.clone() for k, t in m.items()}
            continue
        new[layer] = {}
        for kind, keep in m.items():
            want = units_to_prune(ratio, keep.numel())
            keep = keep.clone()
            have = int((~keep).sum())
            if want > have:
                s = scores[layer][kind].clone().float()
                s[~keep] = float("inf")
                order = torch.argsort(s, stable=True)
                keep[order[: want - have]] = False
            new[layer][kind] = keep
    return new
