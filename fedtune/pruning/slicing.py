"""Physical removal of pruned structures: a smaller dense model with the same forward pass."""

from __future__ import annotations

import torch
from torch import nn

from fedtune.pruning.masks import Masks
from fedtune.pruning.structure import LayerStructure, module_keep

__all__ = ["slice_model"]


def _slice_linear(lin: nn.Linear, keep: torch.Tensor, dim: str) -> nn.Linear:
    idx = keep.nonzero().flatten()
    weight = lin.weight.data[idx] if dim == "rows" else lin.weight.data[:, idx]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=lin.bias is not None,
                    dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[idx] if dim == "rows" else lin.bias.data)
    return new


def slice_model(model: nn.Module, structure: list[LayerStructure], masks: Masks) -> nn.Module:
    """Physically remove pruned heads/groups and channels from a plain (merged) HF model."""
    for path, (how, keep) in module_keep(structure, masks).items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, _slice_linear(getattr(parent, leaf), keep, how))
    return model
