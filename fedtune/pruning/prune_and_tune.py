"""Iterative prune-and-tune inside a client's local training (FedSpine, LoRAPrune).

:class:`PruneAndTune` is driven by :func:`fedtune.training.local.train_local`: after every
backward pass it accumulates group importance (exponential moving average), every ``H``
steps it prunes toward the round's target ratio on a cubic schedule, and after every
optimizer step it keeps the LoRA coordinates of pruned structures at zero, so a pruned
head or channel receives no update. The math lives in :mod:`fedtune.pruning`.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.core.protocol import PruneSpec
from fedtune.models.loading import float_weight
from fedtune.pruning.importance import (
    cubic_ratio,
    lora_weight_gradient,
    prune_step,
    unit_scores,
)
from fedtune.pruning.masks import structural_sparsity
from fedtune.pruning.structure import (
    LayerStructure,
    Masks,
    apply_masks,
    full_masks,
    module_keep,
)

__all__ = ["PruneSpec", "PruneAndTune", "event_steps"]


def event_steps(total_steps: int, interval: int, recovery_steps: int = 0) -> list[int]:
    """Local steps (from 1) after which a pruning event happens: every ``interval`` steps, none in
    the last ``recovery_steps`` (at least one event, at the latest allowed step)."""
    last = max(1, total_steps - recovery_steps)
    return list(range(interval, last + 1, interval)) or [last]


class PruneAndTune:
    def __init__(self, model: torch.nn.Module, lora_layers: dict[str, Any], structure: list[LayerStructure],
                 spec: PruneSpec, total_steps: int, *, masks: Masks | None = None,
                 scores: dict[int, dict[str, torch.Tensor]] | None = None, seed: int = 0) -> None:
        self.model, self.layers, self.structure, self.spec = model, lora_layers, structure, spec
        self.masks = masks if masks is not None else full_masks(structure)
        self.scores = scores
        self.start = structural_sparsity(self.masks, spec.skip_layers)  # of the prunable layers: where the schedule starts
        events = event_steps(total_steps, spec.interval, spec.recovery_steps)
        if self.start >= spec.target:
            events = []
        self.events = {step: k + 1 for k, step in enumerate(events)}
        self.num_events = len(events)
        self.gen = torch.Generator().manual_seed(seed)
        self.handles: list[Any] = []
        self.prunable = set(module_keep(structure, self.masks))
        if spec.importance == "taylor":
            for path in self.prunable & set(self.layers):
                self.layers[path].base_layer.weight.requires_grad_(True)
        self._refresh()

    def _refresh(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = apply_masks(self.model, self.structure, self.masks)
        self.keep = module_keep(self.structure, self.masks)

    def _weight_importance(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for path in self.prunable & set(self.layers):
                layer = self.layers[path]
                w = float_weight(layer.base_layer)  # dequantized when the base is 4- or 8-bit
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                s = layer.scaling["default"]
                merged = w.float() + s * (b @ a)
                if self.spec.importance == "lora":
                    ga = a.grad if a.grad is not None else torch.zeros_like(a)
                    gb = b.grad if b.grad is not None else torch.zeros_like(b)
                    out[path] = (lora_weight_gradient(a, b, ga, gb, s) * merged).abs()
                elif self.spec.importance == "taylor":
                    g = layer.base_layer.weight.grad
                    if g is not None:
                        out[path] = (g.float() * w.float()).abs()
                elif self.spec.importance == "magnitude":
                    out[path] = merged.abs()
                else:  # random
                    out[path] = torch.rand(merged.shape, generator=self.gen).to(merged.device)
        return out

    def observe(self) -> None:
        """After ``loss.backward()``: update the EMA of group importance. As in LoRAPrune, the
        average starts from zero (the first observation weighs ``1 - ema``, not 1); a later round
        continues from the scores it was given."""
        if not self.num_events:
            return
        if self.spec.importance in ("magnitude", "random") and self.scores is not None:
            return  # static criteria: computed once
        current = {layer: {k: v.cpu() for k, v in m.items()}  # small per-unit vectors live on the CPU
                   for layer, m in unit_scores(self.structure, self._weight_importance()).items()}
        if self.spec.importance in ("magnitude", "random"):
            self.scores = current
            return
        e = self.spec.ema
        prev = self.scores or {}
        self.scores = {layer: {k: e * prev[layer][k] + (1 - e) * v if layer in prev else (1 - e) * v
                               for k, v in m.items()}
                       for layer, m in current.items()}
        if self.spec.importance == "taylor":
            for path in self.prunable & set(self.layers):
                self.layers[path].base_layer.weight.grad = None

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()`` (``step`` counts from 1): prune on schedule, keep zeros."""
        k = self.events.get(step)
        if k is not None and self.scores is not None:
            ratio = cubic_ratio(self.spec.target, self.start, k, self.num_events)
            self.masks = prune_step(self.masks, self.scores, ratio, frozenset(self.spec.skip_layers))
            self._refresh()
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the LoRA rows (q/k/v/up/gate) and columns (o/down) of pruned structures."""
        for path, (how, keep) in self.keep.items():
            if path not in self.layers or bool(keep.all()):
                continue
            layer = self.layers[path]
            if how == "rows":
                w = layer.lora_B["default"].weight
                w[~keep.to(w.device)] = 0.0
            else:
                w = layer.lora_A["default"].weight
                w[:, ~keep.to(w.device)] = 0.0

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for path in self.prunable & set(self.layers):
            self.layers[path].base_layer.weight.requires_grad_(False)
            self.layers[path].base_layer.weight.grad = None
