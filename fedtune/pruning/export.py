"""Export a device's pruned model: merge the adapter, slice away pruned structures, save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedtune.core.config import ExperimentConfig
from fedtune.lora.attach import load_factors
from fedtune.lora.export import combined_factors
from fedtune.lora.factors import GlobalAdapter
from fedtune.models.loading import fresh_float_base
from fedtune.pruning.slicing import slice_model
from fedtune.pruning.structure import Masks, model_structure, sparsity

__all__ = ["export_pruned_model", "load_pruned_model"]


PRUNING_FILE = "fedtune_pruning.json"


def export_pruned_model(state: GlobalAdapter, masks: Masks, cfg: ExperimentConfig, path: Path) -> dict[str, Any]:
    """Merge ``state`` (adapter, frozen part, head) into a fresh base, slice away pruned
    structures and save it (safetensors + config + the pruning plan) under ``path``.

    Load it back with :func:`load_pruned_model`. Returns parameter counts before/after.
    """
    from peft import LoraConfig, get_peft_model

    base = fresh_float_base(cfg)
    params = dict(base.model.named_parameters())
    with torch.no_grad():
        for name, t in state.head.items():
            params[name].copy_(t)
    n_before = sum(p.numel() for p in base.model.parameters())
    factors = combined_factors(state)
    model = base.model
    if factors:
        rank = next(iter(factors.values()))[0].shape[0]
        modules = sorted(factors)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=modules))
        load_factors(peft_model, factors)
        model = peft_model.merge_and_unload()
    structure = model_structure(model)
    slice_model(model, structure, masks)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    base.tokenizer.save_pretrained(str(path))
    n_after = sum(p.numel() for p in model.parameters())
    plan = {"masks": {str(layer): {k: t.tolist() for k, t in m.items()} for layer, m in masks.items()},
            "task": cfg.model.task, "params_before": n_before, "params_after": n_after,
            "sparsity": sparsity(structure, masks, model.config.hidden_size)}
    (path / PRUNING_FILE).write_text(json.dumps(plan))
    return {"params_before": n_before, "params_after": n_after, "sparsity": plan["sparsity"]}


def load_pruned_model(path: str | Path) -> torch.nn.Module:
    """Load a model written by :func:`export_pruned_model`::

        model = fedtune.pruning.export.load_pruned_model("runs/<run>/clients/3/model")
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    path = Path(path)
    plan = json.loads((path / PRUNING_FILE).read_text())
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSequenceClassification if plan["task"] == "classification" else AutoModelForCausalLM
    model = cls.from_config(config)
    masks: Masks = {int(layer): {k: torch.tensor(v, dtype=torch.bool) for k, v in m.items()}
                    for layer, m in plan["masks"].items()}
    slice_model(model, model_structure(model), masks)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if "lm_head" in k or "decoder" in k}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: checkpoint does not match the pruned model (missing {sorted(missing)[:3]},"
                         f" unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()
