"""Typed, validated experiment configuration.

An experiment is one TOML file (see ``simulations/default.toml``) plus ``KEY=VALUE``
overrides. It is parsed once, at the app boundary, into frozen dataclasses; library code
never sees raw dicts. Every key is checked: an unknown key, a wrong type or a bad value
raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

__all__ = ["ConfigError", "ModelConfig", "LoraSettings", "DataConfig", "TrainConfig", "FederationConfig", "PruneConfig", "FleetConfig", "PolicyConfig", "SimulationConfig", "ExperimentConfig", "load_config", "config_from_dict", "config_to_dict", "config_to_toml", "parse_overrides"]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


TASKS = ("classification", "causal-lm")


QUANTIZATIONS = ("none", "nf4", "int8")


QUANTIZATION_CHOICES = (*QUANTIZATIONS, "auto")


DEVICES = ("auto", "cpu", "cuda")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
IMPORTANCE_METHODS = ("lora", "magnitude", "random", "taylor")  # LoRAPrune, |W|, random, first-order Taylor


@dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm"  # packaged name (minilm, smollm2-135m, tiny-bert, tiny-llama), HF id or path
    task: str = "classification"  # "classification" (accuracy) or "causal-lm" (loss, perplexity)
    num_labels: int = 2  # classification only
    max_length: int = 64  # tokens per example after truncation
    # base weights on the clients: "none" | "nf4" | "int8" (bitsandbytes), or "auto": per client, the
    # widest width whose predicted peak memory fits its device (needs fleet.devices)
    quantization: str = "none"
    quantization_by_device: dict[str, str] = field(default_factory=dict)  # device class -> width
    double_quant: bool = True  # NF4: quantize the quantization constants too (QLoRA)
    compute_dtype: str = "float32"  # dtype of 4-bit matmuls (bfloat16 on GPUs that have it)
    device: str = "auto"  # where clients train: "auto" (CUDA when visible), "cpu" or "cuda"
    dtype: str = "float32"  # dtype of the (unquantized) base weights: float32, bfloat16 or float16
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "score"])

    def __post_init__(self) -> None:
        _one_of("model.task", self.task, TASKS)
        _one_of("model.quantization", self.quantization, QUANTIZATION_CHOICES)
        for dev, q in self.quantization_by_device.items():
            _one_of(f"model.quantization_by_device.{dev}", q, QUANTIZATIONS)
        _one_of("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _one_of("model.device", self.device, DEVICES)
        _one_of("model.dtype", self.dtype, COMPUTE_DTYPES)
        _positive("model.max_length", self.max_length)
        if self.task == "classification" and self.num_labels < 2:
            raise ConfigError(f"model.num_labels: must be >= 2, got {self.num_labels}")


@dataclass(frozen=True)
class LoraSettings:
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])  # client i gets ranks[i % len]
    rank_overrides: dict[str, int] = field(default_factory=dict)  # client id -> rank
    alpha: float = 16.0  # peft lora_alpha; the scale is alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # [] = per architecture (query/value, q_proj/v_proj)
    # rank-stabilised scale alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023; peft's use_rslora) instead of
    # alpha / r, so clients of different ranks take steps of comparable size
    rslora: bool = False

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ConfigError("lora.ranks: must list at least one rank")
        for r in [*self.ranks, *self.rank_overrides.values()]:
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"lora.ranks: every rank must be a positive integer, got {r!r}")
        for key in self.rank_overrides:
            if not key.isdigit():
                raise ConfigError(f"lora.rank_overrides: key {key!r} is not a client id (integer)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")

    def rank_for(self, client_id: int) -> int:
        """Static rank assignment: an override, else the ranks list cycled by client id."""
        return self.rank_overrides.get(str(client_id), self.ranks[client_id % len(self.ranks)])

    @property
    def max_rank(self) -> int:
        return max([*self.ranks, *self.rank_overrides.values()])


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "rotten-tomatoes"  # packaged name, path to .jsonl/.csv, or "hf:<name>"
    text_key: str = "text"  # for files and HF datasets
    label_key: str = "label"  # for files and HF datasets (classification)
    split: str = "train"  # HF datasets only
    partitioner: str = "dirichlet"  # any flwr-datasets partitioner (iid, dirichlet, natural-id, ...)
    partition_by: str = "label"  # column for label skew or natural ids
    # extra partitioner kwargs; dirichlet defaults to alpha = 1.0, min_partition_size = 10
    partitioner_args: dict[str, Any] = field(default_factory=dict)
    eval_size: int = 400  # held-out server evaluation examples
    max_examples: int = 0  # cap on the whole corpus before the split; 0 = all

    def __post_init__(self) -> None:
        _positive("data.eval_size", self.eval_size)
        if self.max_examples < 0:
            raise ConfigError(f"data.max_examples: must be >= 0, got {self.max_examples}")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 20  # optimizer steps per client per round
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    num_threads: int = 1  # torch threads per client (match simulation.num_cpus_per_client)
    logit_adjustment: float = 1.0  # classification: tau of the local label-prior logit adjustment; 0 = off
    # causal LM: the cross-entropy over the vocabulary in chunks of this many tokens, each chunk's
    # gradient formed at once, so a (tokens x vocab) logit tensor never exists (used when a batch has
    # more tokens than one chunk); 0 = off
    loss_chunk_tokens: int = 1024
    gradient_checkpointing: bool = False  # recompute the decoder's activations in the backward pass

    def __post_init__(self) -> None:
        _positive("train.local_steps", self.local_steps)
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens: must be >= 0, got {self.loss_chunk_tokens}")
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_batch_size", self.eval_batch_size)
        _positive("train.num_threads", self.num_threads)
        if self.logit_adjustment < 0:
            raise ConfigError(f"train.logit_adjustment: must be >= 0, got {self.logit_adjustment}")
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate: must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = 20
    num_rounds: int = 10
    clients_per_round: int = 0  # a number of clients; 0 means use fraction_train
    fraction_train: float = 0.3  # fraction of available clients sampled per round
    min_clients: int = 2  # never sample fewer than this
    strategy: str = "hetlora"  # registry name, "module:Class" or "path/file.py:Class"
    strategy_args: dict[str, Any] = field(default_factory=dict)  # kwargs for the strategy
    round_timeout_s: float = 3600.0  # per-round deadline: replies later than this are dropped
    min_replies: int = 1  # fewer valid updates than this leave the global adapter unchanged
    evaluate_every: int = 1  # server-side evaluation period in rounds
    # pruning runs: each evaluation also scores the global adapter under the masks of this many of the
    # round's sampled devices (the first by client id that have masks), recorded as masked_eval_*;
    # reports measure time to target on it. 0 = off
    masked_eval_clients: int = 3
    masked_eval_panel: list[int] = field(default_factory=list)  # fixed client ids instead of the sampled ones

    def __post_init__(self) -> None:
        _positive("federation.num_clients", self.num_clients)
        if self.num_rounds < 0:
            raise ConfigError(f"federation.num_rounds: must be >= 0, got {self.num_rounds}")
        if self.clients_per_round < 0 or self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"federation.clients_per_round: must be in [0, num_clients={self.num_clients}],"
                f" got {self.clients_per_round}"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"federation.fraction_train: must be in (0, 1], got {self.fraction_train}")
        _positive("federation.min_clients", self.min_clients)
        _positive("federation.evaluate_every", self.evaluate_every)
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _positive("federation.min_replies", self.min_replies)
        if self.masked_eval_clients < 0:
            raise ConfigError(f"federation.masked_eval_clients: must be >= 0, got {self.masked_eval_clients}")
        bad = [c for c in self.masked_eval_panel if not 0 <= c < self.num_clients]
        if bad:
            raise ConfigError(f"federation.masked_eval_panel: client {bad[0]} is not in [0, num_clients={self.num_clients})")

    def sample_size(self, available: int) -> int:
        n = self.clients_per_round or int(available * self.fraction_train)
        return min(available, max(n, self.min_clients))


@dataclass(frozen=True)
class PruneConfig:
    # target sparsity: the fraction of each layer's attention heads (KV groups for GQA models)
    # and FFN channels a client prunes; 0 = no pruning. The bandit sets it per client later.
    ratio: float = 0.0
    ratio_overrides: dict[str, float] = field(default_factory=dict)  # client id -> ratio
    interval: int = 20  # H: local steps between pruning events
    recovery_steps: int = 0  # a round's last local steps without a pruning event, so the adapter recovers
    importance: str = "lora"  # lora (LoRAPrune) | magnitude | random | taylor
    ema: float = 0.9  # moving-average factor of group importance
    skip_layers: list[int] = field(default_factory=list)  # layer indices that are never pruned
    skip_edge_layers: bool = True  # also never prune the first and last layer (LoRAPrune); only for models of > 2 layers
    export_client_models: bool = True  # write runs/<run>/clients/<id>/model at the end
    # at the end, complete every device that took part to the run's target sparsity (fedspine:
    # policy.target_sparsity; else the largest prune.ratio) and measure a few deployed models
    # (accuracy, size, CPU latency) in summary.json["deployment"]; see fedtune/deployed.py
    deploy_to_target: bool = True
    deploy_eval_clients: int = 4  # deployed models evaluated (one per device class first); 0 = none

    def __post_init__(self) -> None:
        for key, r in [("prune.ratio", self.ratio), *((f"prune.ratio_overrides.{k}", v)
                                                       for k, v in self.ratio_overrides.items())]:
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1), got {r}")
        for key in self.ratio_overrides:
            if not key.isdigit():
                raise ConfigError(f"prune.ratio_overrides: key {key!r} is not a client id (integer)")
        _positive("prune.interval", self.interval)
        if self.recovery_steps < 0:
            raise ConfigError(f"prune.recovery_steps: must be >= 0, got {self.recovery_steps}")
        _one_of("prune.importance", self.importance, IMPORTANCE_METHODS)
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"prune.ema: must be in [0, 1), got {self.ema}")
        if self.deploy_eval_clients < 0:
            raise ConfigError(f"prune.deploy_eval_clients: must be >= 0, got {self.deploy_eval_clients}")
        if any(i < 0 for i in self.skip_layers):
            raise ConfigError(f"prune.skip_layers: layer indices must be >= 0, got {self.skip_layers}")

    def ratio_for(self, client_id: int) -> float:
        return self.ratio_overrides.get(str(client_id), self.ratio)

    @property
    def enabled(self) -> bool:
        return self.ratio > 0 or any(v > 0 for v in self.ratio_overrides.values())


@dataclass(frozen=True)
class FleetConfig:
    # device mix, e.g. {jetson-tx2 = 30, jetson-xavier-nx = 40, jetson-agx-xavier = 10}; client i gets
    # the i-th device of the expanded mix. Empty = no fleet: no simulated clock.
    devices: dict[str, int] = field(default_factory=dict)
    profiles: str = ""  # a TOML file of extra or overriding device profiles
    deadline_s: float = 0.0  # simulated round deadline; stragglers past it are dropped (0 = none)
    dtype: str = "fp32"  # compute dtype for the devices' peak throughput
    # simulate each device's availability (a profile's probability of taking part in a round);
    # turn off on a real deployment, where a node takes part when it is connected
    simulate_availability: bool = True

    def __post_init__(self) -> None:
        if self.deadline_s < 0:
            raise ConfigError(f"fleet.deadline_s: must be >= 0, got {self.deadline_s}")
        _one_of("fleet.dtype", self.dtype, ("fp32", "fp16", "bf16", "int8"))


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "s-ucb"  # bandit of the fedspine strategy: registry name, module:Class or file.py:Class
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # arm grid / range
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    target_sparsity: float = 0.3  # the reward's pruning-progress target
    # "target": an arm's ratio is the sparsity the client prunes toward this round; "step": it is
    # how much further to prune this round, capped at target_sparsity (every client ends there)
    ratio_mode: str = "target"
    args: dict[str, Any] = field(default_factory=dict)  # policy constructor options

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ConfigError(f"policy.ratios: need ratios in [0, 1), got {self.ratios}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"policy.ranks: need positive ranks, got {self.ranks}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ConfigError(f"policy.target_sparsity: must be in [0, 1), got {self.target_sparsity}")
        _one_of("policy.ratio_mode", self.ratio_mode, ("target", "step"))


@dataclass(frozen=True)
class SimulationConfig:
    backend: str = "ray"
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_tmpdir: str = "/tmp/fedtune-ray"  # keep short: Ray's socket path must stay < 107 bytes
    ray_address: str = ""  # attach to a running Ray cluster ("host:port" of `ray start --head`); "" = local
    # on a GPU: each device class's share of the GPU (e.g. {jetson-tx2 = 0.1, jetson-agx-xavier = 0.25}):
    # a client of that class trains under that CUDA memory cap; Ray reserves the largest share per worker
    gpu_fraction_by_device: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for dev, f in self.gpu_fraction_by_device.items():
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"simulation.gpu_fraction_by_device.{dev}: must be in (0, 1], got {f}")
        if self.num_cpus_per_client <= 0:
            raise ConfigError(f"simulation.num_cpus_per_client: must be > 0, got {self.num_cpus_per_client}")
        if self.num_gpus_per_client < 0:
            raise ConfigError(f"simulation.num_gpus_per_client: must be >= 0, got {self.num_gpus_per_client}")


FAULT_KINDS = ("raise", "crash", "hang", "nan", "shape", "rank", "missing")


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for testing a deployment's resilience: client id -> fault kind.

    ``raise``: the client raises; ``crash``: its process exits (use in deployment; in a Ray
    simulation it takes the worker actor down); ``hang``: it sleeps ``hang_s`` before replying;
    ``nan``: its update holds NaN; ``shape``: a wrong matrix shape; ``rank``: a wrong rank;
    ``missing``: a module is left out. ``rounds``: the rounds it happens in (empty: every round).
    """

    clients: dict[str, str] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)
    hang_s: float = 60.0

    def __post_init__(self) -> None:
        for cid, kind in self.clients.items():
            if not cid.lstrip("-").isdigit():
                raise ConfigError(f"faults.clients.{cid}: keys are client ids")
            _one_of(f"faults.clients.{cid}", kind, FAULT_KINDS)
        _positive("faults.hang_s", self.hang_s)

    def fault_for(self, client_id: int, server_round: int) -> str | None:
        if self.rounds and server_round not in self.rounds:
            return None
        return self.clients.get(str(client_id))


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    @property
    def prunes(self) -> bool:
        """Whether clients may prune: a static ratio, or the fedspine bandit with ratios above 0."""
        return self.prune.enabled or (self.federation.strategy == "fedspine" and max(self.policy.ratios) > 0)

    @property
    def deploy_sparsity(self) -> float:
        """The sparsity every device is completed to before deployment (0 = no completion)."""
        if not (self.prunes and self.prune.deploy_to_target):
            return 0.0
        if self.federation.strategy == "fedspine":
            return self.policy.target_sparsity
        return max([self.prune.ratio, *self.prune.ratio_overrides.values()])

    def __post_init__(self) -> None:
        n_devices = sum(self.fleet.devices.values())
        if self.fleet.devices and n_devices != self.federation.num_clients:
            raise ConfigError(f"fleet.devices: the mix has {n_devices} devices but federation.num_clients ="
                              f" {self.federation.num_clients}")
        for key, table in (("model.quantization_by_device", self.model.quantization_by_device),
                           ("simulation.gpu_fraction_by_device", self.simulation.gpu_fraction_by_device)):
            unknown = sorted(set(table) - set(self.fleet.devices))
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}: not a device class of fleet.devices"
                                  f" ({', '.join(self.fleet.devices) or 'no fleet'})")
        if self.model.quantization == "auto" and not self.fleet.devices:
            raise ConfigError("model.quantization: 'auto' picks a width per device and needs fleet.devices")
        if self.federation.min_clients > self.federation.num_clients:
            raise ConfigError(
                f"federation.min_clients: {self.federation.min_clients} exceeds"
                f" federation.num_clients={self.federation.num_clients}"
            )


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return {str(k): _check_value(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")  # pragma: no cover
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {dotted!r} (known keys here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _check_value(dotted, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def _set_dotted(table: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = table
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a table")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """Parse ``KEY=VALUE`` strings; VALUE is read as TOML, else taken as a bare string."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {pair!r}: empty key")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.append((key, value))
    return out


def config_from_dict(table: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    table = _deep_copy(table)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(table, key, value)
    return _build(ExperimentConfig, table, "")


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Read a TOML file; a missing file or bad TOML is a ConfigError naming ``what`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {p}: invalid TOML: {exc}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from a TOML file (or the defaults) and apply overrides."""
    table = read_toml(path, "config file") if path is not None else {}
    return config_from_dict(table, overrides)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: ExperimentConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def _deep_copy(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in table.items()}


def section_from_dict(cls: type, table: dict[str, Any], prefix: str) -> Any:
    """Build and validate one config section (e.g. :class:`ModelConfig` from ``[model]``); errors
    name the dotted key under ``prefix``."""
    return _build(cls, table, prefix)
