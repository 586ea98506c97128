"""Export the global model: a standard PEFT adapter directory and resumable checkpoints.

The PEFT adapter holds the trainable global adapter and any frozen (FLoRA) part as one
LoRA of rank ``R = r_adapter + r_frozen`` (concatenated factors: exact), with
``lora_alpha = R`` so peft's scale is 1 and ``lora_B`` is fedtune's B. For classification
the task head is saved as ``modules_to_save``. Load it with::

    peft.PeftModel.from_pretrained(base_model, run_dir + "/adapter")
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from fedtune.adapters import Factors, GlobalAdapter
from fedtune.config import ExperimentConfig
from fedtune.models import BaseModel, cached_base_model, default_target_modules, load_base_model, load_factors
from fedtune.pruning import Masks, model_structure, slice_model, sparsity
from fedtune.records import record_to_state, state_to_record

__all__ = ["combined_factors", "save_peft_adapter", "save_checkpoint", "load_checkpoint", "export_pruned_model",
           "load_pruned_model"]


def dequantize_linears(model: torch.nn.Module) -> int:
    """Replace bitsandbytes 4-/8-bit linears by float ``nn.Linear`` holding their dequantized
    weights (what the quantized forward multiplies by); returns how many were replaced."""
    from fedtune.pruning import float_weight

    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        w = float_weight(module)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if module.bias is not None:
                lin.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
        replaced += 1
    if replaced and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return replaced


def _fresh_base(cfg: ExperimentConfig) -> BaseModel:
    """A private float copy of the base model: a deep copy of the process's cached one (no disk
    reload per exported client); a quantized base is reloaded (it does not deep-copy) and
    dequantized, so the export merges, slices and saves plain float weights."""
    if cfg.model.quantization != "none":
        base = load_base_model(cfg.model, cfg.seed)
        dequantize_linears(base.model)
        return base
    base = cached_base_model(cfg.model, cfg.seed)
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def combined_factors(state: GlobalAdapter) -> Factors:
    """adapter + frozen as one LoRA: ``[B_a, B_f] [A_a; A_f] = B_a A_a + B_f A_f``."""
    out: Factors = {}
    for m in sorted(set(state.adapter) | set(state.frozen)):
        parts = [p[m] for p in (state.adapter, state.frozen) if m in p]
        out[m] = (torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1))
    return out


def save_peft_adapter(state: GlobalAdapter, cfg: ExperimentConfig, path: Path) -> Path:
    """Write ``path`` as a PEFT LoRA adapter directory (adapter_config.json + safetensors)."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = _fresh_base(cfg)  # export wraps the head and merges: never touch the cached base
    factors = combined_factors(state)
    rank = next(iter(factors.values()))[0].shape[0]
    head_modules = sorted({n.rsplit(".", 1)[0] for n in base.head_names})
    targets = list(cfg.lora.target_modules) or default_target_modules(base.architecture, cfg.prunes)
    task = TaskType.SEQ_CLS if cfg.model.task == "classification" else TaskType.CAUSAL_LM
    peft_cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, task_type=task,
                          modules_to_save=head_modules or None)
    peft_model = get_peft_model(base.model, peft_cfg)
    load_factors(peft_model, factors)
    if state.head:
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, t in state.head.items():
                module, leaf = name.rsplit(".", 1)
                key = next(k for k in params if k.endswith(f"{module}.modules_to_save.default.{leaf}"))
                params[key].copy_(t)
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(path))
    return path


def save_checkpoint(state: GlobalAdapter, server_round: int, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Atomically write the server state after ``server_round`` (safetensors + JSON)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_to_record(state).to_torch_state_dict()  # the same key scheme as messages
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / "state.safetensors")
    meta = {"round": server_round, **(extra or {})}
    (path / "meta.json.tmp").write_text(json.dumps(meta))
    (path / "meta.json.tmp").replace(path / "meta.json")


def load_checkpoint(path: Path) -> tuple[GlobalAdapter, dict[str, Any]]:
    meta = json.loads((path / "meta.json").read_text())
    return record_to_state(ArrayRecord(load_file(str(path / "state.safetensors")))), meta


PRUNING_FILE = "fedtune_pruning.json"


def export_pruned_model(state: GlobalAdapter, masks: Masks, cfg: ExperimentConfig, path: Path) -> dict[str, Any]:
    """Merge ``state`` (adapter, frozen part, head) into a fresh base, slice away pruned
    structures and save it (safetensors + config + the pruning plan) under ``path``.

    Load it back with :func:`load_pruned_model`. Returns parameter counts before/after.
    """
    from peft import LoraConfig, get_peft_model

    base = _fresh_base(cfg)
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

        model = fedtune.export.load_pruned_model("runs/<run>/clients/3/model")
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

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
