"""Decoding and validating one client's train reply (the server's trust boundary).

Validation runs in two steps. First, from each array's metadata alone (nothing is decoded
yet): the record holds exactly the expected keys (every adapter module of the global adapter
at the rank the client was sent, the task head, pruning masks of the model's structure
groups, each under the keys of the reply transport codec, :mod:`fedtune.lora.transport`),
every array is a NumPy-serialised tensor of the dtype its key allows (fp32: any float; fp16:
float16; bf16: uint16 bit patterns; int8: int8 values with float32 scales; masks: 8-bit,
steps: 64-bit integers) of exactly the expected shape, no array carries more bytes than its
shape needs, and the adapter record is within ``max_bytes``. Only then are tensors built and
decoded, and checked again: decoded shapes and dtypes, int8 scales finite and non-negative,
all values finite, ``num_examples`` positive, masks and pruning steps consistent. Anything else raises :class:`ValueError` (or a
:class:`RecordError`) with the reason, which the strategy logs and records as a rejected
update; a reply can never raise anything else out of :meth:`ReplyDecoder.decode`.

The transport (Flower's gRPC or the in-memory simulation grid) has already received the
message when a strategy sees it; its own message size limits apply before this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedtune.core.protocol import ARRAYS, MASK_STEPS, MASKS, METRICS, TrainMetrics
from fedtune.lora.factors import ClientUpdate, is_finite_adapter
from fedtune.lora.records import SEP, record_to_factors
from fedtune.lora.transport import FLOAT_DTYPES, expected_arrays, nominal_bytes
from fedtune.pruning.masks import (
    MASK_PREFIX,
    Masks,
    masks_from_tensors,
    steps_from_tensors,
)
from fedtune.pruning.structure import LayerStructure, module_keep

__all__ = ["ReplyDecoder", "DecodedReply", "check_arrays", "check_encoded", "FLOAT_DTYPES"]

MASK_DTYPES = frozenset({"uint8", "bool"})
STEP_DTYPES = frozenset({"int64", "int32"})
NPY_HEADER_BYTES = 4096  # what a .npy header may add to an array's raw bytes
REPLY_SLACK_BYTES = 64 * 1024


def check_arrays(record: ArrayRecord, expected: dict[str, tuple[int, ...]], dtypes: frozenset[str], what: str,
                 max_bytes: int | None = None) -> int:
    """Check a record from its arrays' metadata before anything is decoded; returns its size in bytes.

    ``expected`` maps every key the record must hold to its shape. Raises :class:`ValueError`
    naming the record, the key and what is wrong.
    """
    return check_encoded(record, {k: (shape, dtypes) for k, shape in expected.items()}, what, max_bytes)


def check_encoded(record: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], frozenset[str]]], what: str,
                  max_bytes: int | None = None) -> int:
    """:func:`check_arrays` with a shape and allowed dtypes per key (an encoded record's metadata,
    :func:`fedtune.lora.transport.expected_arrays`); returns the record's size in bytes."""
    keys = set(record.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise ValueError(f"{what}: keys differ from the expected ones (missing {missing[:2]}, extra {extra[:2]})")
    total = 0
    for key, arr in record.items():
        want, dtypes = expected[key]
        if not isinstance(arr, Array):
            raise ValueError(f"{what}: {key} is a {type(arr).__name__}, not an array")
        if arr.stype != "numpy.ndarray":
            raise ValueError(f"{what}: {key} is serialised as {arr.stype!r}, expected 'numpy.ndarray'")
        if arr.dtype not in dtypes:
            raise ValueError(f"{what}: {key} has dtype {arr.dtype!r}, expected one of {sorted(dtypes)}")
        shape = tuple(int(x) for x in arr.shape)
        if shape != tuple(want):
            raise ValueError(f"{what}: {key} has shape {shape}, expected {tuple(want)}")
        size = len(arr.data)
        if size > math.prod(shape) * np.dtype(arr.dtype).itemsize + NPY_HEADER_BYTES:
            raise ValueError(f"{what}: {key} carries {size} bytes, more than a {arr.dtype} array of {shape} needs")
        total += size
    if max_bytes is not None and total > max_bytes:
        raise ValueError(f"{what}: {total} bytes, above the cap of {max_bytes}")
    return total


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
    max_bytes: int = 0  # cap on the adapter record's bytes (0: the expected size plus a 64 KiB slack)
    codec: str = "fp32"  # the reply transport codec (federation.transport_up)

    def base_arrays(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of a rank-``rank`` adapter reply (base keys) and its shape."""
        out: dict[str, tuple[int, ...]] = {}
        for m, (out_f, in_f) in self.module_shapes.items():
            out[f"adapter{SEP}{m}{SEP}A"] = (rank, in_f)
            out[f"adapter{SEP}{m}{SEP}B"] = (out_f, rank)
        for k, shape in self.head_shapes.items():
            out[f"head{SEP}{k}"] = tuple(shape)
        return out

    def expected_arrays(self, rank: int, codec: str | None = None) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
        """Every key of a rank-``rank`` adapter reply encoded with ``codec`` (default: the decoder's),
        with its shape and allowed dtypes."""
        return expected_arrays(self.base_arrays(rank), codec or self.codec)

    def expected_bytes(self, rank: int, codec: str | None = None) -> int:
        """The encoded size of a rank-``rank`` adapter reply plus headers and slack: the default cap."""
        codec = codec or self.codec
        keys = len(self.expected_arrays(rank, codec))
        return nominal_bytes(self.base_arrays(rank), codec) + keys * NPY_HEADER_BYTES + REPLY_SLACK_BYTES

    def decode(self, reply: Message, client_id: int, rank: int, codec: str | None = None) -> DecodedReply:
        """Decode and validate the reply of ``client_id``, which was sent a rank-``rank`` adapter and
        answers in ``codec`` (default: the decoder's)."""
        codec = codec or self.codec
        content = reply.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise ValueError(f"reply lacks the {ARRAYS!r} or {METRICS!r} record")
        check_encoded(content[ARRAYS], self.expected_arrays(rank, codec),
                      "adapter" if codec == "fp32" else f"adapter ({codec})",
                      self.max_bytes or self.expected_bytes(rank, codec))
        mask_keys = self.mask_arrays()
        if MASKS in content.array_records:
            if self.structure is None:
                raise ValueError("client sent pruning masks but the server knows no model structure")
            check_arrays(content[MASKS], mask_keys, MASK_DTYPES, "pruning masks")
        if MASK_STEPS in content.array_records:
            check_arrays(content[MASK_STEPS], mask_keys, STEP_DTYPES, "pruning steps")
        factors, head = record_to_factors(content[ARRAYS], codec)
        for name, t in [*((f"{m}.A", ab[0]) for m, ab in factors.items()),
                        *((f"{m}.B", ab[1]) for m, ab in factors.items()), *head.items()]:
            if not t.is_floating_point():
                raise ValueError(f"{name}: decoded as {t.dtype}, not a floating tensor")
        factors = {m: (a.float(), b.float()) for m, (a, b) in factors.items()}
        head = {k: t.float() for k, t in head.items()}
        metrics = TrainMetrics.from_record(content[METRICS])
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

    def mask_arrays(self) -> dict[str, tuple[int, ...]]:
        """Every key of a pruning-mask record and its shape (empty when the model is not pruned)."""
        out: dict[str, tuple[int, ...]] = {}
        for ls in self.structure or []:
            out[f"{MASK_PREFIX}{SEP}{ls.layer}{SEP}attn"] = (ls.num_units,)
            out[f"{MASK_PREFIX}{SEP}{ls.layer}{SEP}ffn"] = (ls.ffn_dim,)
        return out

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
