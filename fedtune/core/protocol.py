"""The wire and record protocol: every key that goes into a Flower message or into
``metrics.jsonl`` is defined here, once, with one spelling (``snake_case`` everywhere).

A train round is one :class:`TrainRequest` (server -> client, a ``ConfigRecord`` named
``config`` beside the client's adapter in ``arrays``) and one reply: the trained adapter in
``arrays``, :class:`TrainMetrics` in ``metrics``, :class:`ReplyInfo` in ``info`` and, when the
client prunes, its masks in ``masks``. An identify query (``QUERY``) is answered with
:class:`NodeIdentity`. The request carries what the client needs for its round (model, data,
LoRA and training settings, its rank, seed, pruning job and base-weight width), never the
whole experiment: the run stays reproducible from the server's ``config.toml``.

Flower records hold flat scalars, lists and strings, so nested config sections travel as
JSON strings and are rebuilt (and validated) with :func:`fedtune.core.config.section_from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

from fedtune.core.config import (
    IMPORTANCE_METHODS,
    DataConfig,
    ExperimentConfig,
    LoraSettings,
    ModelConfig,
    PruneConfig,
    TrainConfig,
    section_from_dict,
)

__all__ = [
    "ARRAYS", "CONFIG", "IDENTIFY", "INFO", "MASKS", "MASK_STEPS", "METRICS", "NODE_STATE_PRUNE", "QUERY_KIND",
    "ClientKey", "ClientSetup", "NodeIdentity", "PruneSpec", "ReplyInfo", "RoundKey", "Status", "TrainMetrics",
    "TrainRequest", "TrainerSettings", "client_setup",
]

# ---------------------------------------------------------------------------- record names

ARRAYS = "arrays"  # ArrayRecord: the adapter (request: projected global; reply: trained)
CONFIG = "config"  # ConfigRecord: the request, or an identify query / answer
METRICS = "metrics"  # MetricRecord: TrainMetrics
MASKS = "masks"  # ArrayRecord: the client's pruning masks after its round (fedtune.pruning.masks)
MASK_STEPS = "mask_steps"  # ArrayRecord: per unit, the local step after which it was pruned (-1 kept)
INFO = "info"  # ConfigRecord: ReplyInfo
QUERY_KIND = "query"  # key of an identify query
IDENTIFY = "identify"  # its value
NODE_STATE_PRUNE = "fedtune.prune"  # a client's node-state ArrayRecord: masks and importance EMA


def _json_section(obj: Any) -> str:
    return json.dumps(dataclasses.asdict(obj), sort_keys=True)


@dataclass(frozen=True)
class PruneSpec:
    """One round's pruning job on a client (LoRAPrune's prune-and-tune)."""

    target: float  # fraction of each layer's heads/groups and FFN channels pruned by the round's end
    interval: int = 20  # H: local steps between pruning events (FedSpine found 20 best)
    importance: str = "lora"  # lora | magnitude | random | taylor
    ema: float = 0.9  # moving-average factor of group importance
    skip_layers: tuple[int, ...] = ()  # layers never pruned
    recovery_steps: int = 0  # the round's last local steps have no pruning event (the adapter recovers)

    @classmethod
    def from_config(cls, prune: PruneConfig, target: float, num_layers: int) -> PruneSpec:
        """A round's job at ``target`` from the experiment's ``[prune]`` settings, for a model of
        ``num_layers`` layers. With ``prune.skip_edge_layers`` the first and last layers join
        ``prune.skip_layers`` (as in LoRAPrune), but only when the model has more than 2 layers:
        with 1 or 2 layers that would leave nothing to prune, so there every layer stays prunable."""
        skip = set(prune.skip_layers)
        if prune.skip_edge_layers and num_layers > 2:
            skip |= {0, num_layers - 1}
        return cls(target=target, interval=prune.interval, importance=prune.importance, ema=prune.ema,
                   skip_layers=tuple(sorted(skip)), recovery_steps=prune.recovery_steps)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"prune target must be in [0, 1), got {self.target}")
        if self.importance not in IMPORTANCE_METHODS:
            raise ValueError(f"prune importance must be one of {IMPORTANCE_METHODS}, got {self.importance!r}")


@dataclass(frozen=True)
class ClientSetup:
    """What a client needs to build its base model, its data partition and its trainer; the same
    for every client and round of a run, so a worker caches what it builds from it. It satisfies
    :class:`TrainerSettings` (as does an :class:`~fedtune.core.config.ExperimentConfig`)."""

    model: ModelConfig  # with the client's base-weight width resolved (quantization_by_device empty)
    data: DataConfig
    lora: LoraSettings
    train: TrainConfig
    num_clients: int  # partitions of the corpus
    seed: int  # the run's seed (base-model init of test models, partitioning)
    prunes: bool  # whether LoRA targets every prunable linear (LoRAPrune needs their gradients)

    def to_config(self) -> dict[str, Any]:
        return {"setup.model": _json_section(self.model), "setup.data": _json_section(self.data),
                "setup.lora": _json_section(self.lora), "setup.train": _json_section(self.train),
                "setup.num_clients": self.num_clients, "setup.seed": self.seed, "setup.prunes": self.prunes}

    @classmethod
    def from_config(cls, rec: Any) -> ClientSetup:
        def section(name: str, tp: type) -> Any:
            return section_from_dict(tp, json.loads(str(rec[f"setup.{name}"])), f"{name}.")

        return cls(model=section("model", ModelConfig), data=section("data", DataConfig),
                   lora=section("lora", LoraSettings), train=section("train", TrainConfig),
                   num_clients=int(rec["setup.num_clients"]), seed=int(rec["setup.seed"]),
                   prunes=bool(rec["setup.prunes"]))


class TrainerSettings(Protocol):
    """What the trainer and the evaluator read: training and LoRA settings, and whether LoRA
    covers every prunable linear."""

    @property
    def train(self) -> TrainConfig: ...

    @property
    def lora(self) -> LoraSettings: ...

    @property
    def prunes(self) -> bool: ...


def client_setup(cfg: ExperimentConfig, quantization: str | None = None) -> ClientSetup:
    """The experiment's client-side part, with a client's base-weight width (the server's choice)."""
    model = dataclasses.replace(cfg.model, quantization=quantization or cfg.model.quantization,
                                quantization_by_device={})
    return ClientSetup(model=model, data=cfg.data, lora=cfg.lora, train=cfg.train,
                       num_clients=cfg.federation.num_clients, seed=cfg.seed, prunes=cfg.prunes)


@dataclass(frozen=True)
class TrainRequest:
    """Server -> client: one client's train round (``ConfigRecord`` ``config``)."""

    server_round: int
    client_id: int
    rank: int  # LoRA rank of the adapter sent and trained
    seed: int  # this client-round's seed (minibatches, dropout, random importance)
    setup: ClientSetup
    train_a: bool = True  # False: A is frozen (FFA-LoRA)
    prune: PruneSpec | None = None  # None: no pruning this round (earlier masks stay applied)
    gpu_fraction: float = 0.0  # the device class's share of the GPU (0 = no cap)
    fault: str | None = None  # injected fault (tests of resilience; fedtune.core.config.FaultConfig)
    hang_s: float = 60.0  # how long a "hang" fault sleeps
    transport_down: str = "fp32"  # the codec of the adapter in this message (fedtune.lora.transport)
    transport_up: str = "fp32"  # the codec the reply's adapter must use
    error_feedback: bool = True  # carry what a lossy reply could not send into the next one

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server_round": self.server_round, "client_id": self.client_id, "rank": self.rank,
                               "seed": self.seed, "train_a": self.train_a, "gpu_fraction": self.gpu_fraction,
                               "hang_s": self.hang_s, "transport_down": self.transport_down,
                               "transport_up": self.transport_up, "error_feedback": self.error_feedback,
                               **self.setup.to_config()}
        if self.prune is not None:
            out.update({"prune.target": self.prune.target, "prune.interval": self.prune.interval,
                        "prune.importance": self.prune.importance, "prune.ema": self.prune.ema,
                        "prune.skip_layers": list(self.prune.skip_layers),
                        "prune.recovery_steps": self.prune.recovery_steps})
        if self.fault is not None:
            out["fault"] = self.fault
        return out

    @classmethod
    def from_config(cls, rec: Any) -> TrainRequest:
        """Decode a request; a missing key is a KeyError naming it, a bad section a ConfigError."""
        prune = None
        if "prune.target" in rec:
            prune = PruneSpec(target=float(rec["prune.target"]), interval=int(rec["prune.interval"]),
                              importance=str(rec["prune.importance"]), ema=float(rec["prune.ema"]),
                              skip_layers=tuple(int(x) for x in rec["prune.skip_layers"]),
                              recovery_steps=int(rec["prune.recovery_steps"]))
        return cls(server_round=int(rec["server_round"]), client_id=int(rec["client_id"]), rank=int(rec["rank"]),
                   seed=int(rec["seed"]), setup=ClientSetup.from_config(rec), train_a=bool(rec["train_a"]),
                   prune=prune, gpu_fraction=float(rec.get("gpu_fraction", 0.0)),
                   fault=str(rec["fault"]) if "fault" in rec else None, hang_s=float(rec.get("hang_s", 60.0)),
                   transport_down=str(rec.get("transport_down", "fp32")),
                   transport_up=str(rec.get("transport_up", "fp32")),
                   error_feedback=bool(rec.get("error_feedback", True)))


@dataclass
class TrainMetrics:
    """Client -> server: what a client measured in its round (``MetricRecord`` ``metrics``)."""

    num_examples: int = 0  # examples in the client's partition (FedAvg weight)
    train_loss: float = math.nan  # mean loss over the local steps
    train_time_s: float = math.nan  # wall time of the local steps
    setup_s: float = math.nan  # loading the base model and the partition (0 when cached)
    handle_time_s: float = math.nan  # the whole message handling
    steps: int = 0  # local optimizer steps run
    tokens: int = 0  # token positions processed (padded batches), for the cost model
    loss_start: float = math.nan  # mean loss of the first quarter of the steps
    loss_end: float = math.nan  # mean loss of the last quarter
    rank: int = 0
    client_id: int = -1
    prune_ratio: float | None = None  # structural sparsity reached (fedtune.pruning.masks), when it prunes
    param_sparsity: float | None = None  # fraction of the prunable weights' parameters removed
    process_s: float = math.nan  # age of the ClientApp process at its reply (deployment; NaN in Ray)
    # Where a deployment's fresh ClientApp process spent its time (absent in Ray; clients/app.py):
    app_loaded_s: float | None = None  # process age when clients.app was imported (Flower's start-up behind it)
    handler_s: float | None = None  # process age when the train/evaluate handler was entered
    process_cpu_s: float | None = None  # CPU seconds of the ClientApp process at its reply
    handoff_s: float | None = None  # the worker hand-off's wall time minus the worker's handler

    def to_record(self) -> dict[str, float | int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, rec: Any) -> TrainMetrics:
        """Decode what a client sent; absent fields keep their defaults, unknown keys are ignored."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in dict(rec).items():
            if key not in known or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if known[key].type == "int":
                if not math.isfinite(value):
                    continue  # an unusable count keeps its default; the strategy bounds the rest
                values[key] = int(value)
            else:
                values[key] = float(value)
        return cls(**values)


@dataclass(frozen=True)
class ReplyInfo:
    """Client -> server: where the round ran (``ConfigRecord`` ``info``)."""

    worker: str = ""  # "ray:<node id>" in simulation, "host:<name>" in deployment
    quantization: str = "none"  # the base-weight width the client trained on

    def to_config(self) -> dict[str, str]:
        return {"worker": self.worker, "quantization": self.quantization}

    @classmethod
    def from_config(cls, rec: Any) -> ReplyInfo:
        return cls(worker=str(rec.get("worker", "")), quantization=str(rec.get("quantization", "none")))


@dataclass(frozen=True)
class NodeIdentity:
    """A node's answer to an identify query: its client (partition) id and device class."""

    client_id: int
    device: str = ""  # the node's device class ("" = the fleet mix decides)

    def to_config(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "device": self.device}

    @classmethod
    def from_config(cls, rec: Any) -> NodeIdentity:
        return cls(client_id=int(rec["client_id"]), device=str(rec.get("device", "") or ""))


class RoundKey:
    """Keys of one round's line in ``metrics.jsonl``."""

    ROUND = "round"
    WALL_TIME_S = "wall_time_s"  # wall-clock seconds since the run started
    EVAL_LOSS = "eval_loss"
    EVAL_TIME_S = "eval_time_s"
    MASKED_EVAL_LOSS = "masked_eval_loss"  # mean over the devices whose masks were applied
    MASKED_EVAL_CLIENTS = "masked_eval_clients"  # those devices' client ids ([] = none pruned yet)
    TRAIN_LOSS = "train_loss"  # example-weighted mean of the accepted clients' losses
    BYTES_UP = "bytes_up"
    BYTES_DOWN = "bytes_down"
    CLIENTS = "clients"  # one ClientKey record per sampled client
    SIM_TIME_S = "sim_time_s"  # simulated seconds since the start (fleet runs)
    ROUND_SIM_S = "round_sim_s"  # this round's simulated length


class ClientKey:
    """Keys of one client's record in a round's ``clients`` list."""

    CLIENT_ID = "client_id"
    NODE_ID = "node_id"
    RANK = "rank"
    STATUS = "status"  # a Status value
    REASON = "reason"  # why a client failed, was rejected or dropped
    DEVICE = "device"
    TRAIN_LOSS = "train_loss"
    NUM_EXAMPLES = "num_examples"
    PRUNE_RATIO = "prune_ratio"
    LOSS_START = "loss_start"
    LOSS_END = "loss_end"
    TRAIN_TIME_S = "train_time_s"
    REPLY_S = "reply_s"  # wall seconds from send to reply
    PROCESS_S = "process_s"
    SETUP_S = "setup_s"
    APP_LOADED_S = "app_loaded_s"  # a deployment's ClientApp process: where its time went (TrainMetrics)
    HANDLER_S = "handler_s"
    PROCESS_CPU_S = "process_cpu_s"
    HANDOFF_S = "handoff_s"
    WORKER = "worker"
    QUANTIZATION = "quantization"
    SIM_SECONDS = "sim_seconds"  # simulated client-round: compute + communication
    SIM_COMPUTE_S = "sim_compute_s"
    SIM_COMM_S = "sim_comm_s"
    FLOPS = "flops"  # FLOPs of the client-round's local steps (cost model, at its rank and masks)
    COMM_BYTES = "comm_bytes"  # bytes received plus bytes sent
    PEAK_MEM_GB = "peak_mem_gb"
    REWARD = "reward"  # fedspine: the bandit's reward for this client-round
    ARM = "arm"  # fedspine: {"ratio", "rank"} the bandit played
    UPDATE_NORM = "update_norm"  # L2 norm of the adapter's change (trained minus sent factors)
    HEAD_NORM = "head_norm"  # L2 norm of the task head's change
    CLIP_SCALE = "clip_scale"  # < 1 when the update was clipped to the round's norm bound
    CLAIMED_EXAMPLES = "claimed_examples"  # the num_examples a client claimed, when it was capped


class Status:
    OK = "ok"
    FAILED = "failed"  # the client raised, crashed, timed out or ran out of memory
    REJECTED = "rejected"  # the reply was malformed or non-finite
    DROPPED = "dropped"  # it missed the simulated round deadline

