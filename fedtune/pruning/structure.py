"""LoRA-guided structured pruning: structure groups, importance, masks, schedule, slicing.

LoRAPrune (Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning", arXiv 2305.18403), as used by FedSpine (arXiv 2501.02438): the importance
of a frozen weight ``W`` with adapter ``s B A`` is ``|G * (W + s B A)|`` (elementwise),
where ``G = (dL/dB) A + B (dL/dA) - (dL/dB)(dL/dA)`` (scale applied) approximates
``dL/dW`` from the adapter's gradients only. Scores are summed over *structure groups*,
normalised per module (divided by the module's mean group score), smoothed with an
exponential moving average (0.9), and the lowest groups are pruned every H local steps
toward the target ratio on a cubic schedule. Masks only grow.

Structure groups (``unit`` below):

- BERT-style encoders: an attention head (its rows of query/key/value and its columns of
  ``attention.output.dense``) and an FFN channel (a row of ``intermediate.dense`` and a
  column of ``output.dense``).
- Llama-style decoders with grouped-query attention: an attention unit is a whole KV group
  (its query heads' rows of ``q_proj``, the group's rows of ``k_proj``/``v_proj`` and the
  query heads' columns of ``o_proj``), so every layer keeps ``num_heads / num_kv_heads``
  query heads per KV head and the pruned model runs unchanged; an FFN channel is a row of
  ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.

Pruned structures are masked during training (forward pre-hooks zero the inputs of the
output projections), base weights untouched, so masks work over quantized bases too;
:func:`slice_model` removes them physically for export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedtune.pruning.masks import Masks

__all__ = ["LayerStructure", "model_structure", "Masks", "full_masks", "apply_masks", "sparsity"]


@dataclass(frozen=True)
class LayerStructure:
    """Where one transformer layer's prunable units live (module paths in the base model)."""

    layer: int
    attn_in: tuple[str, ...]  # modules whose output rows belong to attention units (q, k, v)
    attn_out: str  # the attention output projection (columns)
    attn_rows: dict[str, int] = field(default_factory=dict)  # module -> rows per unit
    num_units: int = 0  # attention units (heads, or KV groups)
    ffn_in: tuple[str, ...] = ()  # up (and gate) projections (rows)
    ffn_out: str = ""  # down projection (columns)
    ffn_dim: int = 0

    @property
    def out_cols_per_unit(self) -> int:
        return self.attn_rows[self.attn_in[0]]  # o-proj columns per unit = query rows per unit


def model_structure(model: nn.Module) -> list[LayerStructure]:
    """Structure groups of a BERT-style or Llama-style model (unwrapped HF model)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    out = []
    if kind in ("bert", "roberta"):
        prefix = "bert" if hasattr(model, "bert") else ("roberta" if hasattr(model, "roberta") else "")
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}.encoder.layer.{i}" if prefix else f"encoder.layer.{i}"
            q = [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
            out.append(LayerStructure(
                layer=i, attn_in=tuple(q), attn_out=f"{p}.attention.output.dense",
                attn_rows={m: head_dim for m in q}, num_units=cfg.num_attention_heads,
                ffn_in=(f"{p}.intermediate.dense",), ffn_out=f"{p}.output.dense", ffn_dim=cfg.intermediate_size))
    elif kind in ("llama", "mistral", "qwen2"):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        group = cfg.num_attention_heads // kv
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            q, k, v = (f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v"))
            out.append(LayerStructure(
                layer=i, attn_in=(q, k, v), attn_out=f"{p}.self_attn.o_proj",
                attn_rows={q: group * head_dim, k: head_dim, v: head_dim}, num_units=kv,
                ffn_in=(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), ffn_out=f"{p}.mlp.down_proj",
                ffn_dim=cfg.intermediate_size))
    else:
        raise ValueError(f"structured pruning supports BERT- and Llama-style models, not {kind!r}")
    return out


# layer -> {"attn": bool (num_units,), "ffn": bool (ffn_dim,)}; True = kept


def full_masks(structure: list[LayerStructure]) -> Masks:
    return {ls.layer: {"attn": torch.ones(ls.num_units, dtype=torch.bool),
                       "ffn": torch.ones(ls.ffn_dim, dtype=torch.bool)} for ls in structure}


def expand_rows(mask: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Unit mask (units,) -> row mask (units * per_unit,)."""
    return mask.repeat_interleave(per_unit)


def module_keep(structure: list[LayerStructure], masks: Masks) -> dict[str, tuple[str, torch.Tensor]]:
    """module path -> ("rows" | "cols", bool keep vector) for every prunable module."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for ls in structure:
        m = masks[ls.layer]
        for name in ls.attn_in:
            out[name] = ("rows", expand_rows(m["attn"], ls.attn_rows[name]))
        out[ls.attn_out] = ("cols", expand_rows(m["attn"], ls.out_cols_per_unit))
        for name in ls.ffn_in:
            out[name] = ("rows", m["ffn"].clone())
        out[ls.ffn_out] = ("cols", m["ffn"].clone())
    return out


def apply_masks(model: nn.Module, structure: list[LayerStructure], masks: Masks) -> list[Any]:
    """Zero the inputs of each output projection for pruned units; returns hook handles.

    ``model`` is the module tree whose paths ``structure`` names (for a peft model, pass
    ``peft_model.base_model.model`` so the hooks wrap the LoRA layers too).
    """
    handles = []
    modules = dict(model.named_modules())
    for ls in structure:
        m = masks[ls.layer]
        for path, keep in ((ls.attn_out, expand_rows(m["attn"], ls.out_cols_per_unit)), (ls.ffn_out, m["ffn"])):
            if bool(keep.all()):
                continue
            scale = keep.to(torch.float32)

            def pre_hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], scale: torch.Tensor = scale) -> Any:
                x = args[0]
                return (x * scale.to(device=x.device, dtype=x.dtype), *args[1:])

            handles.append(modules[path].register_forward_pre_hook(pre_hook))
    return handles


def sparsity(structure: list[LayerStructure], masks: Masks, hidden_size: int) -> float:
    """Fraction of the prunable weights' parameters removed by ``masks``."""
    kept = total = 0
    for ls in structure:
        m = masks[ls.layer]
        per_unit = (sum(ls.attn_rows.values()) + ls.out_cols_per_unit) * hidden_size
        per_channel = (len(ls.ffn_in) + 1) * hidden_size
        total += ls.num_units * per_unit + ls.ffn_dim * per_channel
        kept += int(m["attn"].sum()) * per_unit + int(m["ffn"].sum()) * per_channel
    return 1.0 - kept / total
