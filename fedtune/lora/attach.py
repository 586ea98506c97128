"""peft LoRA layers on a cached base model: attach, load fedtune factors, read them back, detach.

A client injects its LoRA layers (:func:`attach_lora`), loads its factors (:func:`load_factors`),
trains, reads them back (:func:`read_factors`) and removes the layers again (:func:`detach_lora`),
so one base model serves any number of clients of any rank. Factor conventions are those of
:mod:`fedtune.lora.factors` (scale folded into B).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtune.core.config import ConfigError, LoraSettings
from fedtune.lora.factors import Factors
from fedtune.models.loading import BaseModel

__all__ = ["attach_lora", "detach_lora", "lora_layers", "load_factors", "read_factors", "add_frozen_delta", "default_target_modules"]


def default_target_modules(architecture: str, pruning: bool = False) -> list[str]:
    """Query/value projections; with pruning, every prunable linear (LoRAPrune needs their gradients)."""
    if architecture in ("bert", "roberta"):
        return ["query", "key", "value", "dense"] if pruning else ["query", "value"]
    if architecture == "distilbert":
        return ["q_lin", "v_lin"]
    if pruning:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return ["q_proj", "v_proj"]


def attach_lora(base: BaseModel, rank: int, lora: LoraSettings, pruning: bool = False) -> Any:
    """Inject fresh LoRA layers of ``rank`` into the cached base model (in place).

    Their scale is ``lora.alpha / rank``, or ``lora.alpha / sqrt(rank)`` with ``lora.rslora``
    (rank-stabilised LoRA, peft's ``use_rslora``). :func:`load_factors` and :func:`read_factors`
    divide out and fold in whichever scale the layer has, so factors stay comparable across both.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules) or default_target_modules(base.architecture, pruning)
    peft_cfg = LoraConfig(r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias="none", use_rslora=bool(lora.rslora))
    try:
        return get_peft_model(base.model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {targets} do not match modules of {base.config.name!r}: {exc}") from exc


def detach_lora(peft_model: Any, base: BaseModel) -> None:
    """Remove the LoRA layers again, leaving the cached base model as it was loaded."""
    base.model = peft_model.unload()
    for p in base.model.parameters():
        p.requires_grad_(False)


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """Module path (relative to the base model) -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name: mod for name, mod in inner.named_modules() if isinstance(mod, LoraLayer)}


def module_shapes(peft_model: Any) -> dict[str, tuple[int, int]]:
    """Module path -> (out_features, in_features) of every LoRA-wrapped linear."""
    return {n: (m.out_features, m.in_features) for n, m in lora_layers(peft_model).items()}


def load_factors(peft_model: Any, factors: Factors) -> None:
    """Copy fedtune factors into peft's layers: lora_A = A, lora_B = B / scale."""
    layers = lora_layers(peft_model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            if name not in layers:
                raise KeyError(f"adapter module {name!r} is not a LoRA layer of this model")
            layer = layers[name]
            scale = layer.scaling["default"]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b / scale)


def read_factors(peft_model: Any) -> Factors:
    """Read peft's layers back as fedtune factors (scale folded into B)."""
    out: Factors = {}
    for name, layer in lora_layers(peft_model).items():
        scale = layer.scaling["default"]
        a = layer.lora_A["default"].weight.detach().float().cpu().clone()
        b = layer.lora_B["default"].weight.detach().float().cpu().clone() * scale
        out[name] = (a, b)
    return out


def add_frozen_delta(peft_model: Any, frozen: Factors) -> list[Any]:
    """Add ``x @ (B_f A_f)^T`` to each module's output as a frozen path; returns hook handles."""
    layers = lora_layers(peft_model)
    handles = []
    for name, (a, b) in frozen.items():
        dev = next(layers[name].parameters()).device
        a_f, b_f = a.detach().float().to(dev), b.detach().float().to(dev)

        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 a_f: torch.Tensor = a_f, b_f: torch.Tensor = b_f) -> torch.Tensor:
            x = inputs[0].to(a_f.dtype)
            return output + ((x @ a_f.T) @ b_f.T).to(output.dtype)

        handles.append(layers[name].register_forward_hook(hook))
    return handles
