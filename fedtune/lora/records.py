"""The only place where adapter states become Flower records and back.

Key scheme inside one ``ArrayRecord`` (flat, so any Flower transport carries it):
``adapter::<module>::A``, ``adapter::<module>::B``, ``frozen::<module>::A|B`` and
``head::<param name>``. Factors follow :mod:`fedtune.lora.factors` (A (r, in), B (out, r),
scale folded into B). Every function takes the transport ``codec`` of
:mod:`fedtune.lora.transport` (``fp32``, the default, is what checkpoints and exported adapters
hold; the others change how each tensor travels and add key suffixes, see there).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedtune.lora.factors import Factors, GlobalAdapter
from fedtune.lora.transport import SEP, RecordError, decode, encode

__all__ = ["RecordError", "SEP", "state_to_tensors", "tensors_to_state", "state_to_record", "record_to_state",
           "factors_to_record", "record_to_factors"]


def _put_factors(out: dict[str, torch.Tensor], prefix: str, factors: Factors) -> None:
    for module, (a, b) in factors.items():
        out[f"{prefix}{SEP}{module}{SEP}A"] = a.detach().float().contiguous()
        out[f"{prefix}{SEP}{module}{SEP}B"] = b.detach().float().contiguous()


def state_to_tensors(state: GlobalAdapter) -> dict[str, torch.Tensor]:
    """An adapter state as float32 tensors under the base keys."""
    tensors: dict[str, torch.Tensor] = {}
    _put_factors(tensors, "adapter", state.adapter)
    _put_factors(tensors, "frozen", state.frozen)
    for name, t in state.head.items():
        tensors[f"head{SEP}{name}"] = t.detach().float().contiguous()
    return tensors


def tensors_to_state(tensors: dict[str, torch.Tensor]) -> GlobalAdapter:
    """Base-key tensors as an adapter state; raises :class:`RecordError` naming a malformed key."""
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


def state_to_record(state: GlobalAdapter, codec: str = "fp32") -> ArrayRecord:
    return encode(state_to_tensors(state), codec)


def factors_to_record(factors: Factors, head: dict[str, torch.Tensor] | None = None,
                      codec: str = "fp32") -> ArrayRecord:
    return state_to_record(GlobalAdapter(adapter=factors, head=head or {}), codec)


def record_to_state(record: ArrayRecord, codec: str = "fp32") -> GlobalAdapter:
    """Decode an ArrayRecord encoded with ``codec``; raises :class:`RecordError` naming a malformed key."""
    try:
        tensors = decode(record, codec)
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed record
        raise RecordError(f"array record cannot be decoded: {exc}") from exc
    return tensors_to_state(tensors)


def record_to_factors(record: ArrayRecord, codec: str = "fp32") -> tuple[Factors, dict[str, torch.Tensor]]:
    state = record_to_state(record, codec)
    return state.adapter, state.head
