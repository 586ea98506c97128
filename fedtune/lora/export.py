"""Export the global adapter as a standard PEFT adapter directory.

The PEFT adapter holds the trainable global adapter and any frozen (FLoRA) part as one
LoRA of rank ``R = r_adapter + r_frozen`` (concatenated factors: exact), with
``lora_alpha = R`` and ``use_rslora = False`` (whatever ``lora.rslora`` the clients trained
with: their scale is already folded into fedtune's B) so peft's scale is 1 and ``lora_B`` is
fedtune's B. For classification the task head is saved as ``modules_to_save``. Load it with::

    peft.PeftModel.from_pretrained(base_model, run_dir + "/adapter")

``base_model_name_or_path`` in ``adapter_config.json`` is the base model's Hub id for the packaged
models (``sentence-transformers/all-MiniLM-L6-v2``, ``HuggingFaceTB/SmolLM2-135M-Instruct``), else
``model.name``; the adapter's ``README.md`` says which local weights the run trained on
(:func:`fedtune.models.loading.base_model_reference`). With ``outputs.adapter_every = k`` the
round loop also writes the global adapter after every k-th round to ``adapter/round-N/``
(:func:`round_adapter_dir`), in the same format.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from fedtune.core.config import ExperimentConfig
from fedtune.lora.attach import default_target_modules, load_factors
from fedtune.lora.factors import Factors, GlobalAdapter
from fedtune.models.loading import base_model_reference, fresh_float_base

__all__ = ["combined_factors", "remove_round_adapters", "round_adapter_dir", "save_peft_adapter"]

ROUND_DIR = re.compile(r"round-(\d+)")
BASE_SECTION = "## Base model weights"


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
    name_or_path, source = base_model_reference(cfg.model, cfg.seed)
    base.model.name_or_path = name_or_path  # a private copy: peft and its model card read the id from here
    base.model.config.name_or_path = name_or_path
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
    # the vocabulary is never resized: no full embedding copy, and no Hub lookup of the base model's config
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    card = path / "README.md"  # peft's model card; an earlier export's section is replaced
    text = card.read_text() if card.is_file() else ""
    text = text.split(BASE_SECTION)[0].rstrip("\n")
    card.write_text(f"{text}\n\n{BASE_SECTION}\n\nfedtune run `{cfg.name}` trained this adapter on {source}.\n")
    return path


def round_adapter_dir(adapter_dir: Path, server_round: int) -> Path:
    """Where the global adapter after ``server_round`` is exported: ``<adapter_dir>/round-N``."""
    return adapter_dir / f"round-{server_round}"


def remove_round_adapters(adapter_dir: Path, after_round: int) -> list[Path]:
    """Remove the ``round-N`` adapters of ``adapter_dir`` with ``N > after_round`` (rounds a resumed
    or restarted run trains again); returns them."""
    if not adapter_dir.is_dir():
        return []
    stale = [d for d in adapter_dir.iterdir()
             if d.is_dir() and (m := ROUND_DIR.fullmatch(d.name)) and int(m.group(1)) > after_round]
    for d in stale:
        shutil.rmtree(d)
    return stale
