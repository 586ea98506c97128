"""Export the global adapter as a standard PEFT adapter directory.

The PEFT adapter holds the trainable global adapter and any frozen (FLoRA) part as one
LoRA of rank ``R = r_adapter + r_frozen`` (concatenated factors: exact), with
``lora_alpha = R`` and ``use_rslora = False`` (whatever ``lora.rslora`` the clients trained
with: their scale is already folded into fedtune's B) so peft's scale is 1 and ``lora_B`` is
fedtune's B. For classification the task head is saved as ``modules_to_save``. Load it with::

    peft.PeftModel.from_pretrained(base_model, run_dir + "/adapter")
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.core.config import ExperimentConfig
from fedtune.lora.attach import default_target_modules, load_factors
from fedtune.lora.factors import Factors, GlobalAdapter
from fedtune.models.loading import fresh_float_base

__all__ = ["combined_factors", "save_peft_adapter"]


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

    base = fresh_float_base(cfg)  # export wraps the head and merges: never touch the cached base
    factors = combined_factors(state)
    rank = next(iter(factors.values()))[0].shape[0]
    head_modules = sorted({n.rsplit(".", 1)[0] for n in base.head_names})
    targets = list(cfg.lora.target_modules) or default_target_modules(base.architecture, cfg.prunes)
    task = TaskType.SEQ_CLS if cfg.model.task == "classification" else TaskType.CAUSAL_LM
    peft_cfg = LoraConfig(r=rank, lora_alpha=rank, use_rslora=False, target_modules=targets, task_type=task,
                          modules_to_save=head_modules or None)  # scale 1: B is fedtune's B
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
