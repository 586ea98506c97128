"""Typed, validated experiment configuration.

An experiment is one TOML file (see ``simulations/default.toml``) plus ``KEY=VALUE``
overrides. It is parsed once, at the app boundary, into frozen dataclasses; library code
never sees raw dicts. Every key is checked: an unknown key, a wrong type or a bad value
raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

__all__ = ["ConfigError", "ModelConfig", "LoraSettings", "DataConfig", "TrainConfig", "FederationConfig", "PruneConfig", "FleetConfig", "PolicyConfig", "SimulationConfig", "OutputsConfig", "ExperimentConfig", "load_config", "config_from_dict", "ray_host_port", "config_to_dict", "config_to_toml", "parse_overrides"]


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
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "score"])  # classification: names of the task-head modules (trained and averaged with the adapter)

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
    dropout: float = 0.0  # peft lora_dropout on the adapter input, in [0, 1)
    target_modules: list[str] = field(default_factory=list)  # [] = per architecture (query/value, q_proj/v_proj)
    # rank-stabilised scale alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023; peft's use_rslora) instead of
    # alpha / r, so a higher rank keeps learning instead of slowing down; under AdamW the adapter's
    # per-step change then grows about as sqrt(r): pair it with train.lr_reference_rank
    rslora: bool = False

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ConfigError("lora.ranks: must list at least one rank")
        for r in [*self.ranks, *self.rank_overrides.values()]:
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"lora.ranks: every rank must be a positive integer, got {r!r}")
        _client_id_keys("lora.rank_overrides", self.rank_overrides)
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha: must be a finite number > 0, got {self.alpha}")
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
    # causal LM instruction data: the prompt column (chatterbot: "question"); set together with
    # response_key, every example is formatted as a user turn and an assistant turn; "" = plain text
    prompt_key: str = ""
    response_key: str = ""  # instruction data: the response column (chatterbot: "answer"); see prompt_key
    split: str = "train"  # HF datasets only
    partitioner: str = "dirichlet"  # any flwr-datasets partitioner (iid, dirichlet, natural-id, ...)
    partition_by: str = "label"  # column for label skew or natural ids
    # extra partitioner kwargs; dirichlet defaults to alpha = 1.0, min_partition_size = 10
    partitioner_args: dict[str, Any] = field(default_factory=dict)
    eval_size: int = 400  # held-out server evaluation examples
    # stratify the held-out set on this column (e.g. "label"): each value keeps its corpus share; "" = a plain
    # seeded random sample
    eval_stratify: str = ""
    max_examples: int = 0  # cap on the whole corpus before the split; 0 = all
    # fraction of each client's partition held out as its own evaluation split (seeded; never
    # trained on), for the federated evaluate phase (federation.evaluate_clients); 0 = none
    client_eval_fraction: float = 0.0

    def __post_init__(self) -> None:
        _positive("data.eval_size", self.eval_size)
        if not (math.isfinite(self.client_eval_fraction) and 0.0 <= self.client_eval_fraction < 1.0):
            raise ConfigError(f"data.client_eval_fraction: must be in [0, 1), got {self.client_eval_fraction}")
        if self.max_examples < 0:
            raise ConfigError(f"data.max_examples: must be >= 0, got {self.max_examples}")
        if bool(self.prompt_key) != bool(self.response_key):
            missing = "data.response_key" if self.prompt_key else "data.prompt_key"
            raise ConfigError(f"{missing}: data.prompt_key and data.response_key are set together (instruction"
                              f" data) or not at all; got prompt_key={self.prompt_key!r},"
                              f" response_key={self.response_key!r}")
        if self.prompt_key and self.prompt_key == self.response_key:
            raise ConfigError(f"data.response_key: must differ from data.prompt_key, both {self.prompt_key!r}")

    @property
    def instruction(self) -> bool:
        """Whether the data set is prompt/response pairs (both keys set)."""
        return bool(self.prompt_key and self.response_key)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 20  # optimizer steps per client per round
    batch_size: int = 16  # training examples per local step
    learning_rate: float = 2e-3  # the local optimizer's learning rate
    weight_decay: float = 0.0  # decoupled (AdamW) or L2 (SGD) weight decay
    # the clients' local optimizer: "adamw" normalises every coordinate's step, so a client whose
    # loss is already near zero (a one-class client under logit adjustment) still takes full-size
    # steps; "sgd" steps in proportion to the gradient (FedAvg's and FedOpt's client optimizer)
    optimizer: str = "adamw"
    momentum: float = 0.0  # SGD momentum (reset every round with the optimizer); ignored by adamw
    adam_eps: float = 1e-8  # AdamW's epsilon: coordinates whose gradient is far below it take steps in proportion to it
    # > 0: a client training at rank r uses learning_rate * sqrt(lr_reference_rank / r), which keeps the
    # per-step change of an rsLoRA adapter (alpha / sqrt(r)) under AdamW about equal across ranks; 0 = off
    lr_reference_rank: int = 0
    eval_batch_size: int = 64  # examples per batch in evaluation
    num_threads: int = 1  # torch threads per client (match simulation.num_cpus_per_client)
    logit_adjustment: float = 1.0  # classification: tau of the local label-prior logit adjustment; 0 = off
    # causal LM: the cross-entropy over the vocabulary in chunks of this many tokens, each chunk's
    # gradient formed at once, so a (tokens x vocab) logit tensor never exists (used when a batch has
    # more tokens than one chunk); 0 = off
    loss_chunk_tokens: int = 1024
    gradient_checkpointing: bool = False  # recompute the decoder's activations in the backward pass
    # instruction data (data.prompt_key / response_key): "response" puts the loss on the response tokens
    # only (prompt and padding labels are -100, in training and evaluation); "all" on every token
    loss_on: str = "response"
    lr_schedule: str = "constant"  # learning rate over a round's local steps: "constant", "cosine" or "linear" (to 0)
    warmup_steps: int = 0  # local steps of linear warm-up to train.learning_rate at the start of every round
    max_grad_norm: float = 0.0  # clip the trainable parameters' gradient to this global L2 norm each step; 0 = off

    def __post_init__(self) -> None:
        _positive("train.local_steps", self.local_steps)
        _one_of("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _non_negative("train.warmup_steps", self.warmup_steps)
        _non_negative("train.max_grad_norm", self.max_grad_norm)
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens: must be >= 0, got {self.loss_chunk_tokens}")
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_batch_size", self.eval_batch_size)
        _positive("train.num_threads", self.num_threads)
        _non_negative("train.logit_adjustment", self.logit_adjustment)
        _one_of("train.loss_on", self.loss_on, ("response", "all"))
        _positive("train.learning_rate", self.learning_rate)
        _non_negative("train.weight_decay", self.weight_decay)
        _one_of("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _positive("train.adam_eps", self.adam_eps)
        _non_negative("train.lr_reference_rank", self.lr_reference_rank)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train.momentum: must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = 20  # clients (data partitions) in the federation
    num_rounds: int = 10  # federated rounds to run
    clients_per_round: int = 0  # a number of clients; 0 means use fraction_train
    fraction_train: float = 0.3  # fraction of available clients sampled per round
    min_clients: int = 2  # never sample fewer than this
    strategy: str = "hetlora"  # registry name, "module:Class" or "path/file.py:Class"
    strategy_args: dict[str, Any] = field(default_factory=dict)  # kwargs for the strategy
    round_timeout_s: float = 3600.0  # per-round deadline: replies later than this are dropped
    min_replies: int = 1  # fewer valid updates than this leave the global adapter unchanged
    evaluate_every: int = 1  # server-side evaluation period in rounds
    # federated evaluation: this many clients (seeded sample) evaluate the global adapter on their
    # own held-out split (data.client_eval_fraction) in Flower's evaluate phase; 0 = off
    evaluate_clients: int = 0
    evaluate_clients_every: int = 1  # period in rounds of the federated evaluation (and always the last round)
    # pruning runs: each evaluation also scores the global adapter under the masks of this many of the
    # round's sampled devices (the first by client id that have masks), recorded as masked_eval_*;
    # reports measure time to target on it. 0 = off
    masked_eval_clients: int = 3
    masked_eval_panel: list[int] = field(default_factory=list)  # fixed client ids instead of the sampled ones
    # how the server learns which client (partition) a node serves: "query" asks every node once
    # (deployments, where a node holds its own data); "assign" numbers the nodes itself in node-id
    # order and names the client in each train message (simulation: any virtual node serves any
    # partition, so clients that are not sampled cost nothing); "auto" = assign on Flower's
    # simulation engine, query otherwise
    client_ids: str = "auto"
    # how adapters travel, per direction (fedtune/lora/transport.py): "fp32", "fp16", "bf16" (as
    # uint16 bit patterns) or "int8" (per-slice symmetric scales); checkpoints stay fp32
    transport_down: str = "fp32"  # the server's payloads
    transport_up: str = "fp32"  # the clients' replies
    # with a lossy transport_up, a client adds what its last reply could not carry (value minus
    # decoded value, kept in its node state) to its next reply before encoding
    error_feedback: bool = True
    # server optimizer on each round's aggregated update (strategies/server_opt.py; Reddi et al., ICLR 2021):
    # "none" (the aggregate is the new global adapter), "avgm", "adam", "yogi" or "adagrad"
    server_optimizer: str = "none"
    server_lr: float = 1.0  # server learning rate (eta) of the server optimizer
    server_momentum: float = 0.0  # FedAvgM's momentum, in [0, 1)
    server_beta1: float = 0.9  # first-moment decay of adam, yogi and adagrad, in [0, 1)
    server_beta2: float = 0.99  # second-moment decay of adam and yogi, in [0, 1)
    server_tau: float = 1e-3  # adaptivity (added to the root of the second moment) of adam, yogi and adagrad

    def __post_init__(self) -> None:
        _positive("federation.num_clients", self.num_clients)
        _one_of("federation.server_optimizer", self.server_optimizer, ("none", "avgm", "adam", "yogi", "adagrad"))
        _positive("federation.server_lr", self.server_lr)
        _positive("federation.server_tau", self.server_tau)
        for key in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"federation.{key}: must be in [0, 1), got {getattr(self, key)}")
        for key, codec in (("transport_down", self.transport_down), ("transport_up", self.transport_up)):
            _one_of(f"federation.{key}", codec, ("fp32", "fp16", "bf16", "int8"))
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
        _positive("federation.evaluate_clients_every", self.evaluate_clients_every)
        if not 0 <= self.evaluate_clients <= self.num_clients:
            raise ConfigError(f"federation.evaluate_clients: must be in [0, num_clients={self.num_clients}],"
                              f" got {self.evaluate_clients}")
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _positive("federation.min_replies", self.min_replies)
        if self.masked_eval_clients < 0:
            raise ConfigError(f"federation.masked_eval_clients: must be >= 0, got {self.masked_eval_clients}")
        _one_of("federation.client_ids", self.client_ids, ("auto", "query", "assign"))
        bad = [c for c in self.masked_eval_panel if not 0 <= c < self.num_clients]
        if bad:
            raise ConfigError(f"federation.masked_eval_panel: client {bad[0]} is not in [0, num_clients={self.num_clients})")
        per_round = self.sample_size(self.num_clients)
        if self.min_replies > per_round:
            raise ConfigError(f"federation.min_replies: must be <= the {per_round} clients sampled per round"
                              f" (clients_per_round, fraction_train, min_clients), got {self.min_replies}")

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
        _client_id_keys("prune.ratio_overrides", self.ratio_overrides)
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
    # hidden heterogeneity (fedtune/fleet/hidden.py): per-device multipliers on compute and link
    # speed that no profile shows, drawn from the run's seed; [] = off (the class-determined fleet).
    # "log-uniform" reads [low, high] as a range, "choice" picks one of the listed values
    hidden_compute: list[float] = field(default_factory=list)  # e.g. [0.5, 1.0] with "choice"
    hidden_compute_draw: str = "log-uniform"  # how hidden_compute is drawn: "log-uniform" or "choice"
    hidden_link: list[float] = field(default_factory=list)  # the same for link speed (both directions), e.g. [0.25, 4.0]
    hidden_link_draw: str = "log-uniform"  # how hidden_link is drawn: "log-uniform" or "choice"
    # drift: this fraction of the devices switches between states (a Markov chain from "normal")
    # every drift_every rounds, keeping its state with probability drift_stay; a state is
    # [compute multiplier, link multiplier]
    drift_fraction: float = 0.0
    drift_every: int = 0  # rounds between state changes of drifting devices (>= 1 when drift_fraction > 0)
    drift_stay: float = 0.5  # probability that a drifting device keeps its state at a change
    # drift states besides "normal": name -> [compute multiplier, link multiplier]
    drift_states: dict[str, list[float]] = field(
        default_factory=lambda: {"background-load": [0.5, 1.0], "congested-link": [1.0, 0.25]})

    def __post_init__(self) -> None:
        for dev, count in self.devices.items():
            if count < 0:
                raise ConfigError(f"fleet.devices.{dev}: a device count must be >= 0, got {count}")
        _non_negative("fleet.deadline_s", self.deadline_s)
        _one_of("fleet.dtype", self.dtype, ("fp32", "fp16", "bf16", "int8"))
        for key in ("hidden_compute", "hidden_link"):
            values, draw = getattr(self, key), getattr(self, f"{key}_draw")
            _one_of(f"fleet.{key}_draw", draw, ("log-uniform", "choice"))
            if any(not (math.isfinite(v) and v > 0) for v in values):
                raise ConfigError(f"fleet.{key}: multipliers must be positive numbers, got {values}")
            if values and draw == "log-uniform" and (len(values) != 2 or values[0] > values[1]):
                raise ConfigError(f"fleet.{key}: a log-uniform draw needs [low, high] with low <= high,"
                                  f" got {values}")
        if not 0.0 <= self.drift_fraction <= 1.0:
            raise ConfigError(f"fleet.drift_fraction: must be in [0, 1], got {self.drift_fraction}")
        if self.drift_every < 0 or (self.drift_fraction > 0 and self.drift_every < 1):
            raise ConfigError(f"fleet.drift_every: must be >= 1 rounds when fleet.drift_fraction > 0,"
                              f" got {self.drift_every}")
        if not 0.0 <= self.drift_stay <= 1.0:
            raise ConfigError(f"fleet.drift_stay: must be in [0, 1], got {self.drift_stay}")
        for name, state in self.drift_states.items():
            if len(state) != 2 or any(not (math.isfinite(v) and v > 0) for v in state):
                raise ConfigError(f"fleet.drift_states.{name}: need [compute multiplier, link multiplier],"
                                  f" both positive, got {state}")
        if self.drift_fraction > 0 and not self.drift_states:
            raise ConfigError("fleet.drift_states: drifting devices need at least one state besides normal")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "s-ucb"  # bandit of the fedspine strategy: registry name, module:Class or file.py:Class
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # arm grid / range
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])  # LoRA ranks the bandit chooses from
    target_sparsity: float = 0.3  # the reward's pruning-progress target
    # "target": an arm's ratio is the sparsity the client prunes toward this round; "step": it is
    # how much further to prune this round, capped at target_sparsity (every client ends there)
    ratio_mode: str = "target"
    args: dict[str, Any] = field(default_factory=dict)  # policy constructor options
    # cost-aware policies (cost-ucb) never play an arm predicted to lengthen the round past
    # max(the round's floor, round_time_bound x the round's median predicted seconds at the cheapest
    # arms); round_time_bound_s > 0 replaces the multiple with a fixed bound in seconds
    round_time_bound: float = 1.5
    round_time_bound_s: float = 0.0  # fixed round-time bound in seconds instead of the multiple; 0 = off

    def __post_init__(self) -> None:
        if not math.isfinite(self.round_time_bound) or self.round_time_bound < 1.0:
            raise ConfigError(f"policy.round_time_bound: must be a multiple >= 1, got {self.round_time_bound}")
        if not math.isfinite(self.round_time_bound_s) or self.round_time_bound_s < 0:
            raise ConfigError(f"policy.round_time_bound_s: must be >= 0 seconds, got {self.round_time_bound_s}")
        if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ConfigError(f"policy.ratios: need ratios in [0, 1), got {self.ratios}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"policy.ranks: need positive ranks, got {self.ranks}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ConfigError(f"policy.target_sparsity: must be in [0, 1), got {self.target_sparsity}")
        _one_of("policy.ratio_mode", self.ratio_mode, ("target", "step"))


SIMULATION_BACKENDS = ("ray",)  # Flower's simulation engine has one backend


@dataclass(frozen=True)
class SimulationConfig:
    backend: str = "ray"  # Flower simulation engine backend (only "ray")
    num_cpus_per_client: float = 1.0  # CPUs reserved per client worker (match train.num_threads)
    num_gpus_per_client: float = 0.0  # GPUs (or a fraction of one) reserved per client worker
    ray_tmpdir: str = "/tmp/fedtune-ray"  # keep short: Ray's socket path must stay < 107 bytes
    # attach to a running Ray cluster: "host:port" of `ray start --head`, "ray://host:port" (Ray
    # Client) or "auto" (the cluster `ray start` left on this machine); "" = start a local one
    ray_address: str = ""
    # how long to wait for ray_address to answer before the run fails (seconds)
    ray_connect_timeout_s: float = 30.0
    # on a GPU: each device class's share of the GPU (e.g. {jetson-tx2 = 0.1, jetson-agx-xavier = 0.25}):
    # a client of that class trains under that CUDA memory cap; Ray reserves the largest share per worker
    gpu_fraction_by_device: dict[str, float] = field(default_factory=dict)
    # how Flower's engine hands messages to the workers: "pending" visits only the nodes with an undelivered
    # message (a round's cost does not grow with the registered clients; fedtune/engine/dispatch.py),
    # "flower" runs Flower's thread as it is (every registered node, every 0.1 s)
    dispatch: str = "pending"

    def __post_init__(self) -> None:
        _one_of("simulation.backend", self.backend, SIMULATION_BACKENDS)
        _one_of("simulation.dispatch", self.dispatch, ("pending", "flower"))
        for dev, f in self.gpu_fraction_by_device.items():
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"simulation.gpu_fraction_by_device.{dev}: must be in (0, 1], got {f}")
        _positive("simulation.num_cpus_per_client", self.num_cpus_per_client)
        _non_negative("simulation.num_gpus_per_client", self.num_gpus_per_client)
        if self.ray_address not in ("", "auto", "local") and ray_host_port(self.ray_address) is None:
            raise ConfigError(f"simulation.ray_address: expected host:port, ray://host:port or auto,"
                              f" got {self.ray_address!r}")
        _positive("simulation.ray_connect_timeout_s", self.ray_connect_timeout_s)


def ray_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address ``host:port`` or ``ray://host[:port]`` (Ray Client, port
    10001 by default); None when it is not of either form. IPv6 hosts go in brackets."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep and client:
        host, port = rest, "10001"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() or c in "/[]" for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


FAULT_KINDS = ("raise", "crash", "hang", "nan", "shape", "rank", "missing")


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for testing a deployment's resilience: client id -> fault kind.

    ``raise``: the client raises; ``crash``: its process exits (use in deployment; in a Ray
    simulation it takes the worker actor down); ``hang``: it sleeps ``hang_s`` before replying;
    ``nan``: its update holds NaN; ``shape``: a wrong matrix shape; ``rank``: a wrong rank;
    ``missing``: a module is left out. ``rounds``: the rounds it happens in (empty: every round).
    """

    clients: dict[str, str] = field(default_factory=dict)  # client id -> fault kind (raise, crash, hang, nan, shape, rank, missing)
    rounds: list[int] = field(default_factory=list)  # rounds the faults happen in; [] = every round
    hang_s: float = 60.0  # how long a "hang" client sleeps before replying (seconds)

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


DEFENSE_ACTIONS = ("clip", "reject")


@dataclass(frozen=True)
class DefenseConfig:
    """How far one client's update may move the global model (the server's trust boundary).

    Every accepted update's parameter change (its trained LoRA factors minus the factors it was
    sent, and its task head minus the global head) is measured in L2 norm. An update whose norm
    exceeds ``norm_multiple`` times the round's median (``0`` = no relative bound) or ``norm_cap``
    (``0`` = no fixed cap) is clipped to the bound (``on_excess = "clip"``, the update's change
    scaled down) or rejected (``"reject"``). ``num_examples`` is capped at the size of the
    partition the server assigned to the client, or at ``max_examples`` when that is above 0.
    ``max_reply_bytes`` caps an adapter reply's encoded size (``0`` = the expected size at the
    client's rank plus 64 KiB).
    """

    norm_multiple: float = 3.0  # bound on an update's L2 norm as a multiple of the round's median; 0 = none
    norm_cap: float = 0.0  # fixed bound on an update's L2 norm; 0 = none
    on_excess: str = "clip"  # an update past the bound: "clip" (scaled down to it) or "reject"
    max_examples: int = 0  # cap on a client's num_examples; 0 = the size of its assigned partition
    max_reply_bytes: int = 0  # cap on an adapter reply's encoded size; 0 = expected size at its rank + 64 KiB

    def __post_init__(self) -> None:
        for key in ("norm_multiple", "norm_cap"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"defense.{key}: must be a finite number >= 0, got {value}")
        if 0 < self.norm_multiple < 1:
            raise ConfigError(f"defense.norm_multiple: a bound below the median rejects most clients; use 0 (off)"
                              f" or >= 1, got {self.norm_multiple}")
        _one_of("defense.on_excess", self.on_excess, DEFENSE_ACTIONS)
        for key in ("max_examples", "max_reply_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"defense.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class OutputsConfig:
    """What a run writes besides metrics.jsonl, summary.json, the final adapter and checkpoints."""

    tensorboard: bool = False  # TensorBoard event files under <run>/tensorboard/ (needs the tensorboard package)
    # more trackers of the per-round scalars: "tensorboard", package.module:Class or path/to/file.py:Class
    # (a class with fedtune.tracking.Tracker's methods, constructed with the run directory)
    trackers: list[str] = field(default_factory=list)
    adapter_every: int = 0  # also export the global adapter to adapter/round-N/ every N rounds; 0 = off

    def __post_init__(self) -> None:
        if self.adapter_every < 0:
            raise ConfigError(f"outputs.adapter_every: must be >= 0, got {self.adapter_every}")
        for i, spec in enumerate(self.trackers):
            if not spec.strip():
                raise ConfigError(f"outputs.trackers[{i}]: empty tracker name")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"  # run name: outputs go to runs/<name>-<time>
    seed: int = 0  # seeds every random stream of the run (partitions, sampling, init, fleet)
    model: ModelConfig = field(default_factory=ModelConfig)  # base model, task and quantization
    lora: LoraSettings = field(default_factory=LoraSettings)  # LoRA adapters and client ranks
    data: DataConfig = field(default_factory=DataConfig)  # dataset and its partitioning into clients
    train: TrainConfig = field(default_factory=TrainConfig)  # local training on each client
    federation: FederationConfig = field(default_factory=FederationConfig)  # rounds, sampling, aggregation, transport
    prune: PruneConfig = field(default_factory=PruneConfig)  # structured pruning on the clients
    fleet: FleetConfig = field(default_factory=FleetConfig)  # simulated fleet of unequal devices and its clock
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # the fedspine strategy's bandit
    simulation: SimulationConfig = field(default_factory=SimulationConfig)  # Ray simulation resources
    faults: FaultConfig = field(default_factory=FaultConfig)  # injected client faults (resilience tests)
    defense: DefenseConfig = field(default_factory=DefenseConfig)  # bounds on each client's influence
    outputs: OutputsConfig = field(default_factory=OutputsConfig)  # TensorBoard, trackers, per-round adapters

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
        if self.federation.evaluate_clients > 0 and self.data.client_eval_fraction <= 0:
            raise ConfigError("federation.evaluate_clients: clients evaluate on a held-out part of their"
                              " partition; set data.client_eval_fraction > 0 (e.g. 0.1)")
        if self.model.quantization == "auto" and not self.fleet.devices:
            raise ConfigError("model.quantization: 'auto' picks a width per device and needs fleet.devices")
        if self.federation.min_clients > self.federation.num_clients:
            raise ConfigError(
                f"federation.min_clients: {self.federation.min_clients} exceeds"
                f" federation.num_clients={self.federation.num_clients}"
            )
        n = self.federation.num_clients
        for key, table in (("lora.rank_overrides", self.lora.rank_overrides),
                           ("prune.ratio_overrides", self.prune.ratio_overrides), ("faults.clients", self.faults.clients)):
            for cid in table:
                if not 0 <= int(cid) < n:
                    raise ConfigError(f"{key}.{cid}: no such client (client ids are 0 .. federation.num_clients - 1 ="
                                      f" {n - 1}), got {cid}")
        if (not self.name or Path(self.name).is_absolute() or ".." in self.name
                or any(sep in self.name for sep in ("/", "\\", os.sep))):
            raise ConfigError(f"name: must be a plain folder name (runs go to runs/<name>-<time>; no path separators"
                              f" or '..'), got {self.name!r}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: must be a finite number > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")


def _client_id_keys(key: str, table: dict[str, Any]) -> None:
    """The keys of a per-client table are client ids: integers >= 0 (their upper bound,
    ``federation.num_clients``, is checked by :class:`ExperimentConfig`)."""
    for cid in table:
        if cid.startswith("-") and cid[1:].isdigit():
            raise ConfigError(f"{key}.{cid}: no such client (client ids are >= 0), got {cid}")
        if not cid.isdigit():
            raise ConfigError(f"{key}: key {cid!r} is not a client id (an integer >= 0)")


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
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {p}: not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files are UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{what} {p}: cannot read: {exc.strerror or exc}") from None
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
