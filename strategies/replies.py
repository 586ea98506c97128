"""Decoding and validating one client's train reply (the server's trust boundary).

A reply is accepted only when every record is present and decodes, every adapter module of
the global adapter is there at the rank the client was sent, the task head matches, all
values are finite and ``num_examples`` is positive; pruning masks must match the model's
structure groups. Anything else raises :class:`ValueError` (or a :class:`RecordError`) with
the reason, which the strategy logs and records as a rejected update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

from fedtune.core.protocol import ARRAYS, MASK_STEPS, MASKS, METRICS, TrainMetrics
from fedtune.lora.factors import ClientUpdate, is_finite_adapter
from fedtune.lora.records import record_to_factors
from fedtune.pruning.masks import Masks, masks_from_tensors, steps_from_tensors
from fedtune.pruning.structure import LayerStructure, module_keep

__all__ = ["ReplyDecoder", "DecodedReply"]


@dataclass
class DecodedReply:
    update: ClientUpdate
    metrics: TrainMetrics
    masks: Masks | None  # the client's masks after its round, when it prunes
    pruned_at: Masks | None = None  # per unit, the local step after which it was pruned (-1 kept)


@dataclass
class ReplyDecoder:
    """Validates replies against the global adapter's shapes and the model's structure."""

    module_shapes: dict[str, tuple[int, int]]  # module -> (out, in)
    head_shapes: dict[str, tuple[int, ...]]
    structure: list[LayerStructure] | None = None  # prunable structure groups (None: no pruning)

    def decode(self, reply: Message, client_id: int, rank: int) -> DecodedReply:
        """Decode and validate the reply of ``client_id``, which was sent a rank-``rank`` adapter."""
        if ARRAYS not in reply.content.array_records or METRICS not in reply.content.metric_records:
            raise ValueError(f"reply lacks the {ARRAYS!r} or {METRICS!r} record")
        factors, head = record_to_factors(reply.content[ARRAYS])
        metrics = TrainMetrics.from_record(reply.content[METRICS])
        expected = set(self.module_shapes)
        if set(factors) != expected:
            missing, extra = sorted(expected - set(factors)), sorted(set(factors) - expected)
            raise ValueError(f"adapter modules differ from the global adapter's (missing {missing[:2]}, extra {extra[:2]})")
        for m, (a, b) in factors.items():
            out_f, in_f = self.module_shapes[m]
            if a.shape != (rank, in_f) or b.shape != (out_f, rank):
                raise ValueError(
                    f"{m}: A {tuple(a.shape)}, B {tuple(b.shape)}; expected ({rank}, {in_f}) and ({out_f}, {rank})"
                )
        if set(head) != set(self.head_shapes) or any(tuple(head[k].shape) != self.head_shapes[k] for k in head):
            raise ValueError("task head tensors differ in names or shapes from the global head")
        bad = is_finite_adapter(factors, head)
        if bad is not None:
            raise ValueError(f"non-finite values in {bad}")
        if metrics.num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {metrics.num_examples}")
        keep: dict[str, tuple[str, torch.Tensor]] = {}
        masks = None
        if MASKS in reply.content.array_records:
            masks = self.decode_masks(reply.content[MASKS])
            keep = {m: k for m, k in module_keep(self.structure or [], masks).items() if m in factors}
            for m, (how, vec) in keep.items():
                size = factors[m][1].shape[0] if how == "rows" else factors[m][0].shape[1]
                if vec.numel() != size:
                    raise ValueError(f"{m}: pruning mask has {vec.numel()} entries for {size} {how}")
        pruned_at = None
        if masks is not None and MASK_STEPS in reply.content.array_records:
            pruned_at = self.decode_steps(reply.content[MASK_STEPS], masks, metrics.steps)
        numeric = {k: float(v) for k, v in metrics.to_record().items()}
        update = ClientUpdate(client_id=client_id, rank=rank, factors=factors, head=head,
                              num_examples=metrics.num_examples, train_loss=metrics.train_loss,
                              metrics=numeric, keep=keep)
        return DecodedReply(update=update, metrics=metrics, masks=masks, pruned_at=pruned_at)

    def decode_steps(self, record: ArrayRecord, masks: Masks, steps: int) -> Masks:
        """Per-unit pruning steps, consistent with the final ``masks``: -1 exactly where a unit is
        kept, else a step in [0, steps]."""
        try:
            pruned_at = steps_from_tensors(record.to_torch_state_dict())
        except (ValueError, KeyError) as exc:
            raise ValueError(f"malformed pruning steps: {exc}") from exc
        for layer, m in masks.items():
            got = pruned_at.get(layer, {})
            if set(got) != set(m) or any(got[k].shape != m[k].shape for k in m):
                raise ValueError(f"pruning steps of layer {layer} do not match its masks")
            for k, keep in m.items():
                at = got[k]
                if bool(((at < 0) != keep).any()) or bool((at > max(steps, 0)).any()) or bool((at < -1).any()):
                    raise ValueError(f"pruning steps of layer {layer} {k} are inconsistent with its masks")
        return pruned_at

    def decode_masks(self, record: ArrayRecord) -> Masks:
        if self.structure is None:
            raise ValueError("client sent pruning masks but the server knows no model structure")
        try:
            masks = masks_from_tensors(record.to_torch_state_dict())
        except (ValueError, KeyError) as exc:
            raise ValueError(f"malformed pruning masks: {exc}") from exc
        for ls in self.structure:
            m = masks.get(ls.layer, {})
            if set(m) != {"attn", "ffn"} or m["attn"].shape != (ls.num_units,) or m["ffn"].shape != (ls.ffn_dim,):
                raise ValueError(f"pruning masks of layer {ls.layer} do not match the model's structure")
        return masks
