"""Pruning masks: ``{layer: {"attn": (units,), "ffn": (channels,)}}`` bool tensors, True = kept.

The one place masks are (de)serialised: as flat tensors (messages and a client's node state,
keys ``mask::<layer>::<kind>``) and as '0'/'1' strings (JSON checkpoints).
"""

from __future__ import annotations

import torch

__all__ = ["Masks", "masks_to_tensors", "masks_from_tensors", "masks_to_bits", "masks_from_bits"]

Masks = dict[int, dict[str, torch.Tensor]]

MASK_PREFIX = "mask"


def masks_to_tensors(masks: Masks) -> dict[str, torch.Tensor]:
    """``mask::<layer>::<kind>`` -> uint8 vector (1 = kept)."""
    return {f"{MASK_PREFIX}::{layer}::{kind}": t.to(torch.uint8) for layer, m in masks.items() for kind, t in m.items()}


def masks_from_tensors(tensors: dict[str, torch.Tensor]) -> Masks:
    """Inverse of :func:`masks_to_tensors`; raises ValueError on a key that is not a mask key."""
    out: Masks = {}
    for key, t in tensors.items():
        parts = key.split("::")
        if len(parts) != 3 or parts[0] != MASK_PREFIX:
            raise ValueError(f"not a mask key: {key!r}")
        out.setdefault(int(parts[1]), {})[parts[2]] = t.to(torch.bool)
    return out


def masks_to_bits(masks: Masks) -> dict[str, dict[str, str]]:
    """JSON form: ``{"<layer>": {"attn": "1101...", "ffn": "..."}}``."""
    return {str(layer): {k: "".join("1" if b else "0" for b in t.tolist()) for k, t in m.items()}
            for layer, m in masks.items()}


def masks_from_bits(bits: dict[str, dict[str, str]]) -> Masks:
    """Inverse of :func:`masks_to_bits`."""
    return {int(layer): {k: torch.tensor([c == "1" for c in s], dtype=torch.bool) for k, s in m.items()}
            for layer, m in bits.items()}
