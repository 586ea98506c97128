"""The only place where tensors become Flower records and back.

Key scheme inside one ``ArrayRecord`` (flat, so any Flower transport carries it):
``adapter::<module>::A``, ``adapter::<module>::B``, ``frozen::<module>::A|B`` and
``head::<param name>``. Factors follow :mod:`fedtune.lora.factors` (A (r, in), B (out, r),
scale folded into B).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedtune.lora.factors import Factors, GlobalAdapter

__all__ = ["RecordError", "state_to_record", "record_to_state", "factors_to_record", "record_to_factors"]


SEP = "::"


class RecordError(ValueError):
    """A record does not decode to a well-formed adapter; the message names the key."""


def _put_factors(out: dict[str, torch.Tensor], prefix: str, factors: Factors) -> None:
    for module, (a, b) in factors.items():
        out[f"{prefix}{SEP}{module}{SEP}A"] = a.detach().float().contiguous()
        out[f"{prefix}{SEP}{module}{SEP}B"] = b.detach().float().contiguous()


def state_to_record(state: GlobalAdapter) -> ArrayRecord:
    tensors: dict[str, torch.Tensor] = {}
    _put_factors(tensors, "adapter", state.adapter)
    _put_factors(tensors, "frozen", state.frozen)
    for name, t in state.head.items():
        tensors[f"head{SEP}{name}"] = t.detach().float().contiguous()
    return ArrayRecord(tensors)


def factors_to_record(factors: Factors, head: dict[str, torch.Tensor] | None = None) -> ArrayRecord:
    return state_to_record(GlobalAdapter(adapter=factors, head=head or {}))


def record_to_state(record: ArrayRecord) -> GlobalAdapter:
    """Decode an ArrayRecord; raises :class:`RecordError` naming a malformed key."""
    try:
        tensors = record.to_torch_state_dict()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed record
        raise RecordError(f"array record cannot be decoded: {exc}") from exc
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {"adapter": {}, "frozen": {}}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        pieces = key.split(SEP)
        if pieces[0] == "head" and len(pieces) == 2:
            head[pieces[1]] = t
        elif pieces[0] in parts and len(pieces) == 3 and pieces[2] in ("A", "B"):
            parts[pieces[0]].setdefault(pieces[1], {})[pieces[2]] = t
        else:
            raise RecordError(f"unexpected key {key!r} in adapter record")
    factors: dict[str, Factors] = {"adapter": {}, "frozen": {}}
    for kind, modules in parts.items():
        for module, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise RecordError(f"{kind}{SEP}{module}: needs both A and B, got {sorted(ab)}")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise RecordError(
                    f"{kind}{SEP}{module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r)"
                )
            factors[kind][module] = (a, b)
    return GlobalAdapter(adapter=factors["adapter"], frozen=factors["frozen"], head=head)


def record_to_factors(record: ArrayRecord) -> tuple[Factors, dict[str, torch.Tensor]]:
    state = record_to_state(record)
    return state.adapter, state.head
