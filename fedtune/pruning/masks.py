"""Pruning masks: ``{layer: {"attn": (units,), "ffn": (channels,)}}`` bool tensors, True = kept.

The one place masks are (de)serialised: as flat tensors (messages and a client's node state,
keys ``mask::<layer>::<kind>``) and as '0'/'1' strings (JSON checkpoints).
"""

from __future__ import annotations

import torch

__all__ = ["Masks", "masks_to_tensors", "masks_from_tensors", "masks_to_bits", "masks_from_bits", "structural_sparsity",
           "pruned_masks_at", "mask_segments"]

Masks = dict[int, dict[str, torch.Tensor]]

MASK_PREFIX = "mask"


def masks_to_tensors(masks: Masks) -> dict[str, torch.Tensor]:
    """``mask::<layer>::<kind>`` -> uint8 vector (1 = kept); integer tensors (pruning steps) keep their dtype."""
    return {f"{MASK_PREFIX}::{layer}::{kind}": t if t.dtype != torch.bool else t.to(torch.uint8)
            for layer, m in masks.items() for kind, t in m.items()}


def _read(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Masks:
    out: Masks = {}
    for key, t in tensors.items():
        parts = key.split("::")
        if len(parts) != 3 or parts[0] != MASK_PREFIX:
            raise ValueError(f"not a mask key: {key!r}")
        out.setdefault(int(parts[1]), {})[parts[2]] = t.to(dtype)
    return out


def masks_from_tensors(tensors: dict[str, torch.Tensor]) -> Masks:
    """Inverse of :func:`masks_to_tensors`; raises ValueError on a key that is not a mask key."""
    return _read(tensors, torch.bool)


def steps_from_tensors(tensors: dict[str, torch.Tensor]) -> Masks:
    """Per-unit pruning steps (int64) in :func:`masks_to_tensors`' key scheme."""
    return _read(tensors, torch.int64)


def masks_to_bits(masks: Masks) -> dict[str, dict[str, str]]:
    """JSON form: ``{"<layer>": {"attn": "1101...", "ffn": "..."}}``."""
    return {str(layer): {k: "".join("1" if b else "0" for b in t.tolist()) for k, t in m.items()}
            for layer, m in masks.items()}


def masks_from_bits(bits: dict[str, dict[str, str]]) -> Masks:
    """Inverse of :func:`masks_to_bits`."""
    return {int(layer): {k: torch.tensor([c == "1" for c in s], dtype=torch.bool) for k, s in m.items()}
            for layer, m in bits.items()}


def structural_sparsity(masks: Masks, skip_layers: tuple[int, ...] | frozenset[int] = ()) -> float:
    """fedtune's one sparsity unit: the fraction of structure units (attention heads or KV groups,
    and FFN channels) removed, averaged over the prunable layers and the two kinds. It is the unit
    of ``prune.ratio``, ``policy.target_sparsity`` and a client's reported ``prune_ratio``: a client
    that pruned every prunable layer to the target reports exactly the target. Layers in
    ``skip_layers`` (never pruned) do not count."""
    vals = [1.0 - float(t.float().mean()) for layer, m in masks.items() if layer not in skip_layers
            for t in m.values()]
    return sum(vals) / len(vals) if vals else 0.0


def pruned_masks_at(pruned_at: Masks, step: int) -> Masks:
    """The masks in force during local step ``step`` (from 1) of a round, from each unit's
    ``pruned_at`` step: -1 = kept all round, 0 = pruned before the round, e >= 1 = pruned by the
    event after step e (so removed from step e + 1 on)."""
    return {layer: {k: ~((t >= 0) & (t < step)) for k, t in m.items()} for layer, m in pruned_at.items()}


def mask_segments(pruned_at: Masks, steps: int) -> list[tuple[int, Masks]]:
    """The round's local steps grouped by the masks in force: ``[(number of steps, masks), ...]``."""
    events = sorted({int(v) for m in pruned_at.values() for t in m.values() for v in t.unique().tolist()
                     if 1 <= v < steps})
    bounds = [0, *events, steps]
    return [(hi - lo, pruned_masks_at(pruned_at, lo + 1)) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
