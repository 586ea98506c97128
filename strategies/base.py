"""The LoRA strategy base: a Flower ``Strategy`` that federates low-rank adapters.

A subclass overrides one pure method, :meth:`LoraStrategy.aggregate_adapters`, which
maps the round's client updates (each at its own rank) to the new global adapter. This
class keeps the Flower plumbing and the aggregation hooks: per-node messages with each
client's rank-projected adapter (a :class:`~fedtune.core.protocol.TrainRequest`), seeded
client sampling, and per-client bookkeeping that the round loop reads back as a
:class:`RoundResult`. Replies are validated by :class:`~strategies.replies.ReplyDecoder`
(malformed, wrongly shaped or non-finite updates are rejected with the reason logged; a
crashed client is recorded as failed and the round goes on); on a simulated fleet,
:class:`~fedtune.fleet.clock.FleetClock` charges every client-round and advances the clock.

Collaborators are constructor arguments: the model's prunable ``structure`` (when clients
prune) and the ``fleet`` simulator (when a device fleet is simulated).

Adapter conventions are those of :mod:`fedtune.lora.factors` (``delta_W = B @ A``, scale
folded into B).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.core.metric import metric_for_task
from fedtune.core.protocol import (
    ARRAYS,
    CONFIG,
    IDENTIFY,
    MASKS,
    METRICS,
    QUERY_KIND,
    ClientKey,
    NodeIdentity,
    PruneSpec,
    ReplyInfo,
    Status,
    TrainMetrics,
    TrainRequest,
    client_setup,
)
from fedtune.core.protocol import (
    INFO as INFO_RECORD,
)
from fedtune.core.seeding import derive_seed, rng, torch_generator
from fedtune.fleet.clock import FleetClock, FleetSimulator
from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
    init_factors,
    is_finite_adapter,
    truncate_factors,
)
from fedtune.lora.records import RecordError, record_to_state, state_to_record
from fedtune.pruning.masks import (
    Masks,
    mask_segments,
    masks_from_bits,
    masks_to_bits,
    masks_to_tensors,
)
from fedtune.pruning.structure import LayerStructure
from strategies.replies import ReplyDecoder
from strategies.server_opt import build_server_optimizer, update_space

__all__ = ["CLIENT_EVAL", "LoraStrategy", "RoundResult", "client_eval_summary", "weighted_head_average"]

CLIENT_EVAL = "client_eval"  # metrics.jsonl round key: one record per client asked to evaluate that round
ALL_DEVICES = "all"  # the device class of clients outside a simulated fleet, and the whole-sample row


def weighted_head_average(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Average task-head tensors weighted by ``num_examples`` (FedAvg)."""
    if not updates or not updates[0].head:
        return {}
    total = float(sum(u.num_examples for u in updates))
    return {
        name: sum(u.head[name] * (u.num_examples / total) for u in updates)  # type: ignore[misc]
        for name in updates[0].head
    }


def _change_norms(update: ClientUpdate, sent: GlobalAdapter | None, current: GlobalAdapter | None) -> tuple[float, float]:
    """L2 norms (float64) of an update's adapter change against what it was sent, and of its head change."""
    total = 0.0
    for m, (a, b) in update.factors.items():
        a0, b0 = sent.adapter[m] if sent is not None and m in sent.adapter else (torch.zeros_like(a), torch.zeros_like(b))
        total += float(((a.double() - a0.double()) ** 2).sum()) + float(((b.double() - b0.double()) ** 2).sum())
    head_total = 0.0
    ref = current.head if current is not None else {}
    for k, t in update.head.items():
        t0 = ref.get(k, torch.zeros_like(t))
        head_total += float(((t.double() - t0.double()) ** 2).sum())
    return math.sqrt(total), math.sqrt(head_total)


def _bound(norms: list[float], multiple: float, cap: float) -> float | None:
    """The round's bound: ``multiple`` x the median norm and/or a fixed ``cap`` (None: unbounded)."""
    bounds = []
    median = float(torch.tensor(norms, dtype=torch.float64).median()) if norms else 0.0
    if multiple > 0 and median > 0:
        bounds.append(multiple * median)
    if cap > 0:
        bounds.append(cap)
    return min(bounds) if bounds else None


def _clipped(update: ClientUpdate, sent: GlobalAdapter | None, current: GlobalAdapter | None,
             adapter_scale: float, head_scale: float) -> ClientUpdate:
    """``update`` with its adapter change scaled by ``adapter_scale`` and its head change by ``head_scale``."""
    factors = {}
    for m, (a, b) in update.factors.items():
        a0, b0 = sent.adapter[m] if sent is not None and m in sent.adapter else (torch.zeros_like(a), torch.zeros_like(b))
        factors[m] = ((a0.double() + adapter_scale * (a.double() - a0.double())).to(a.dtype),
                      (b0.double() + adapter_scale * (b.double() - b0.double())).to(b.dtype))
    ref = current.head if current is not None else {}
    head = {k: (ref.get(k, torch.zeros_like(t)).double() + head_scale * (t.double() - ref.get(k, torch.zeros_like(t)).double())).to(t.dtype)
            for k, t in update.head.items()}
    return dataclasses.replace(update, factors=factors, head=head)


@dataclass
class RoundResult:
    """What one round produced, as the round loop records it."""

    state: GlobalAdapter  # the global state after the round (unchanged when no update was valid)
    train_loss: float | None  # example-weighted mean client loss; None when the round was not aggregated
    clients: list[dict[str, Any]] = field(default_factory=list)  # per-client records (ClientKey keys)
    bytes_up: int = 0
    bytes_down: int = 0
    round_sim_s: float | None = None  # simulated length of the round (fleet runs)
    sim_time_s: float | None = None  # simulated seconds since the start (fleet runs)


@dataclass
class _Sent:
    client_id: int
    rank: int
    sent_at: float
    bytes_down: int
    payload: GlobalAdapter | None = None  # what the client was sent (its update is measured against it)


class LoraStrategy(Strategy):
    """Base of every fedtune aggregation rule.

    Parameters
    ----------
    experiment:
        The validated experiment config (ranks, sampling, seed, client settings).
    global_rank:
        Rank of the global adapter; defaults to the largest client rank.
    structure:
        The model's prunable structure groups; needed when clients prune (masks are validated
        against it).
    fleet:
        The simulated device fleet; with it, rounds run on a simulated clock (costs, OOM,
        deadlines, availability) and device classes pick base-weight widths and GPU shares.
    partition_size:
        The number of training examples the server assigned to a client (its partition);
        a client's claimed ``num_examples`` is capped at it (``defense.max_examples`` overrides).
    **options:
        Subclass options; anything left over is an error naming the key.
    """

    #: registry name (set by subclasses)
    name: str = "lora-base"
    #: whether clients train A (False for FFA-LoRA, which freezes it)
    trains_a: bool = True

    def __init__(self, experiment: ExperimentConfig, *, global_rank: int | None = None,
                 structure: list[LayerStructure] | None = None, fleet: FleetSimulator | None = None,
                 partition_size: Callable[[int], int] | None = None, **options: Any) -> None:
        if options:
            key = min(options)
            raise ConfigError(
                f"federation.strategy_args.{key}: unknown option for strategy {type(self).__name__!r}"
            )
        self.experiment = experiment
        self.server_opt = build_server_optimizer(experiment.federation, self.name)  # None: the aggregate is the global
        self.global_rank = int(global_rank or experiment.lora.max_rank)
        if self.global_rank < 1:
            raise ConfigError(f"federation.strategy_args.global_rank: must be >= 1, got {global_rank}")
        self.structure = structure
        self.fleet = fleet
        self.clock = FleetClock(fleet, experiment.fleet.deadline_s) if fleet is not None else None
        self.node_clients: dict[int, int] = {}  # node id -> client id (partition id)
        self.current: GlobalAdapter | None = None
        self.partition_size = partition_size
        self._partition_sizes: dict[int, int] = {}
        self.decoder = ReplyDecoder({}, {}, structure, max_bytes=experiment.defense.max_reply_bytes)
        self.server_round = 0  # the round being configured / aggregated
        self.client_masks: dict[int, Masks] = {}  # latest pruning masks each client reported
        self.trained_rank: dict[int, int] = {}  # rank of each client's last accepted round
        self._sent: dict[int, _Sent] = {}  # node -> what was sent to it this round
        self._prefailed: list[dict[str, Any]] = []
        self._result: dict[int, RoundResult] = {}
        self._eval_sent: dict[int, _Sent] = {}  # node -> the client asked to evaluate this round
        self._eval_records: list[dict[str, Any]] = []  # the last evaluate phase's per-client records

    # ------------------------------------------------------------------ the hook to override

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        """Map this round's client adapters (each at its own rank) to the new global adapter.

        ``updates`` holds only validated replies. Return factors at ``self.global_rank``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks with defaults

    def aggregate(self, updates: list[ClientUpdate], current: GlobalAdapter) -> GlobalAdapter:
        """Full new server state. Default: :meth:`aggregate_adapters` + FedAvg of the head."""
        return GlobalAdapter(
            adapter=self.aggregate_adapters(updates, current),
            frozen=current.frozen,
            head=weighted_head_average(updates) or current.head,
        )

    def initial_state(self, shapes: dict[str, tuple[int, int]], head: dict[str, torch.Tensor]) -> GlobalAdapter:
        """The round-0 global model: peft's LoRA init at the global rank (B = 0), and the head."""
        gen = torch_generator(self.experiment.seed, "init")
        return GlobalAdapter(adapter=init_factors(shapes, self.global_rank, gen), head=dict(head))

    def rank_for(self, client_id: int, server_round: int) -> int:
        """The LoRA rank a client trains at this round (static: from the config)."""
        return self.experiment.lora.rank_for(client_id)

    def prune_ratio_for(self, client_id: int, server_round: int) -> float:
        """The sparsity a client prunes toward this round (static: from the config)."""
        return self.experiment.prune.ratio_for(client_id)

    def client_payload(self, state: GlobalAdapter, client_id: int, rank: int) -> GlobalAdapter:
        """What one client receives: the global adapter projected to its rank (truncation)."""
        adapter = {m: truncate_factors(a, b, rank) for m, (a, b) in state.adapter.items()}
        return GlobalAdapter(adapter=adapter, frozen=state.frozen, head=state.head)

    def after_round(self, server_round: int, records: list[dict[str, Any]]) -> None:
        """Called with the round's per-client records (outcomes) after aggregation; a hook for policies."""

    # ------------------------------------------------------------------ Flower Strategy API

    def summary(self) -> None:
        log(INFO, "\t├──> %s (fedtune LoRA strategy)", type(self).__name__)
        log(INFO, "\t│\t├── global rank: %d, trains A: %s", self.global_rank, self.trains_a)
        fed = self.experiment.federation
        log(INFO, "\t│\t└── sampling: %s per round", fed.clients_per_round or f"{fed.fraction_train:.0%}")

    def set_state(self, state: GlobalAdapter) -> None:
        self.current = state
        self.decoder.module_shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b) in state.adapter.items()}
        self.decoder.head_shapes = {k: tuple(v.shape) for k, v in state.head.items()}

    def discover_clients(self, grid: Grid, timeout: float = 120.0) -> dict[int, int]:
        """Map nodes to client (partition) ids (``federation.client_ids``).

        ``assign``: the first ``num_clients`` nodes in node-id order are clients 0, 1, ...; no
        message is sent, and each train request names the client. ``query``: every node not yet
        mapped is asked once with a QUERY message; a node whose answer is missing, malformed,
        outside ``[0, num_clients)`` or already claimed by another node stays unmapped (it is not
        sampled, and is asked again next round).
        """
        nodes = sorted(grid.get_node_ids())
        if self.assigns_client_ids(grid):
            num = self.experiment.federation.num_clients
            if len(self.node_clients) < min(len(nodes), num):
                taken = set(self.node_clients.values())
                free = iter(c for c in range(num) if c not in taken)
                for n in nodes:
                    if n not in self.node_clients and (cid := next(free, None)) is not None:
                        self.node_clients[n] = cid
            return self.node_clients
        todo = [n for n in nodes if n not in self.node_clients]
        if not todo:
            return self.node_clients
        msgs = [
            Message(RecordDict({CONFIG: ConfigRecord({QUERY_KIND: IDENTIFY})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in todo
        ]
        claimed = {cid: n for n, cid in self.node_clients.items()}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                continue
            try:
                identity = NodeIdentity.from_config(reply.content[CONFIG])
                if not 0 <= identity.client_id < self.experiment.federation.num_clients:
                    raise ValueError(f"client id {identity.client_id} outside [0, federation.num_clients="
                                     f"{self.experiment.federation.num_clients})")
                if identity.client_id in claimed:
                    raise ValueError(f"client id {identity.client_id} is node {claimed[identity.client_id]}'s")
            except (KeyError, ValueError, TypeError) as exc:
                log(WARNING, "node %d: malformed identify reply (%s: %s); not sampled until it identifies",
                    node, type(exc).__name__, exc)
                continue
            self.node_clients[node] = identity.client_id
            claimed[identity.client_id] = node
            if identity.device and self.fleet is not None:
                try:
                    self.fleet.declare(identity.client_id, identity.device)
                except ValueError as exc:
                    log(WARNING, "node %d: %s; using the fleet mix's device", node, exc)
        return self.node_clients

    def assigns_client_ids(self, grid: Grid) -> bool:
        """Whether the server numbers the nodes itself (``federation.client_ids``)."""
        mode = self.experiment.federation.client_ids
        if mode == "auto":
            from flwr.superlink.grid.inmemory_grid import InMemoryGrid

            return isinstance(grid, InMemoryGrid)
        return mode == "assign"

    def sample_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Seeded sampling: the same config and seed sample the same clients each round."""
        fed = self.experiment.federation
        deadline = time.time() + fed.round_timeout_s
        while len(nodes := list(grid.get_node_ids())) < fed.min_clients:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} nodes connected, need federation.min_clients={fed.min_clients}")
            log(INFO, "waiting for nodes: %d connected, need %d", len(nodes), fed.min_clients)
            time.sleep(1.0)
        self.discover_clients(grid)
        nodes = sorted((n for n in nodes if n in self.node_clients), key=lambda n: self.node_clients[n])
        sampler = rng(self.experiment.seed, "sample", server_round)
        size = fed.sample_size(len(nodes))
        if self.fleet is not None:  # only devices that take part this round can be sampled
            nodes = [n for n in nodes if self.fleet.available(self.node_clients[n], server_round)]
            size = min(size, len(nodes))
        chosen = sampler.sample(nodes, size)
        return sorted(chosen, key=lambda n: self.node_clients[n])

    def train_request(self, client_id: int, server_round: int, rank: int) -> TrainRequest:
        """The request one client receives this round: its setup, rank, seed and pruning job."""
        exp = self.experiment
        ratio = float(self.prune_ratio_for(client_id, server_round))
        prune = None
        if ratio > 0:
            prune = PruneSpec.from_config(exp.prune, ratio, len(self.structure or []))
        return TrainRequest(
            server_round=server_round, client_id=client_id, rank=rank,
            seed=derive_seed(exp.seed, "client", server_round, client_id),
            setup=client_setup(exp, self.quantization_for(client_id, rank)), train_a=self.trains_a, prune=prune,
            gpu_fraction=self.gpu_fraction_for(client_id), fault=exp.faults.fault_for(client_id, server_round),
            hang_s=exp.faults.hang_s)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        state = record_to_state(arrays)
        self.set_state(state)
        self.server_round = server_round
        messages = []
        self._sent = {}
        self._prefailed = []
        for node in self.sample_nodes(grid, server_round):
            client_id = self.node_clients[node]
            rank = self.rank_for(client_id, server_round)
            if self.fleet is not None:
                reason = self.fleet.precheck(client_id, rank, self.client_masks.get(client_id))
                if reason is not None:  # the device could not even start: nothing is sent
                    self._prefailed.append({
                        ClientKey.CLIENT_ID: client_id, ClientKey.NODE_ID: node, ClientKey.RANK: rank,
                        ClientKey.STATUS: Status.FAILED, ClientKey.REASON: reason,
                        ClientKey.DEVICE: self.fleet.device(client_id).name, ClientKey.SIM_SECONDS: 0.0})
                    continue
            sent_state = self.client_payload(state, client_id, rank)
            fed = self.experiment.federation
            payload = state_to_record(sent_state, fed.transport_down)  # bytes_down: the encoded size
            if fed.transport_down != "fp32":  # the client starts from what it decodes
                sent_state = record_to_state(payload, fed.transport_down)
            train_request = dataclasses.replace(self.train_request(client_id, server_round, rank),
                                                transport_down=fed.transport_down, transport_up=fed.transport_up,
                                                error_feedback=fed.error_feedback)
            request = ConfigRecord({**dict(config), **train_request.to_config()})
            messages.append(Message(RecordDict({ARRAYS: payload, CONFIG: request}),
                                    dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
            self._sent[node] = _Sent(client_id, rank, time.time(), payload.count_bytes(), sent_state)
        log(INFO, "configure_train: round %d, %d clients, ranks %s", server_round, len(messages),
            sorted({s.rank for s in self._sent.values()}))
        return messages

    def quantization_for(self, client_id: int, rank: int) -> str:
        """The base-weight width this client trains on (per device class, or ``auto`` by memory)."""
        if self.fleet is None:
            return self.experiment.model.quantization
        return self.fleet.quantization(client_id, rank, self.client_masks.get(client_id))

    def gpu_fraction_for(self, client_id: int) -> float:
        """The client's device class's share of the GPU (``simulation.gpu_fraction_by_device``), 0 if none."""
        table = self.experiment.simulation.gpu_fraction_by_device
        if self.fleet is None or not table:
            return 0.0
        return float(table.get(self.fleet.device(client_id).name, 0.0))

    def _sent_to(self, node: int) -> _Sent:
        """What was sent to ``node`` this round (rank -1: nothing)."""
        return self._sent.get(node, _Sent(self.node_clients.get(node, -1), -1, 0.0, 0))

    def _client_record(self, server_round: int, node: int, reply: Message) -> tuple[dict[str, Any], ClientUpdate | None]:
        """One reply's record and, when it is accepted, its update."""
        sent = self._sent_to(node)
        rec: dict[str, Any] = {ClientKey.CLIENT_ID: sent.client_id, ClientKey.NODE_ID: node, ClientKey.RANK: sent.rank}
        if self.fleet is not None:
            rec[ClientKey.DEVICE] = self.fleet.device(sent.client_id).name
        if reply.has_error():
            rec.update({ClientKey.STATUS: Status.FAILED, ClientKey.REASON: str(reply.error.reason)})
            log(WARNING, "round %d: client %d failed: %s", server_round, sent.client_id, reply.error.reason)
            return rec, None
        try:
            decoded = self.decoder.decode(reply, sent.client_id, sent.rank, self.experiment.federation.transport_up)
        except (ValueError, RecordError, KeyError, TypeError) as exc:
            rec.update({ClientKey.STATUS: Status.REJECTED, ClientKey.REASON: str(exc)})
            log(WARNING, "round %d: rejected update of client %d: %s", server_round, sent.client_id, exc)
            return rec, None
        update, m = decoded.update, self._bounded(decoded.metrics)
        cap = self.examples_cap(sent.client_id)
        if cap is not None and update.num_examples > cap:
            log(WARNING, "round %d: client %d claimed %d examples; capped at %d", server_round, sent.client_id,
                update.num_examples, cap)
            rec[ClientKey.CLAIMED_EXAMPLES] = update.num_examples
            update.num_examples = cap
        if decoded.masks is not None:
            self.client_masks[sent.client_id] = decoded.masks
        rec.update({ClientKey.STATUS: Status.OK, ClientKey.TRAIN_LOSS: update.train_loss,
                    ClientKey.NUM_EXAMPLES: update.num_examples,
                    ClientKey.PRUNE_RATIO: m.prune_ratio if m.prune_ratio is not None else 0.0,
                    ClientKey.LOSS_START: m.loss_start, ClientKey.LOSS_END: m.loss_end,
                    ClientKey.TRAIN_TIME_S: m.train_time_s, ClientKey.REPLY_S: round(time.time() - sent.sent_at, 3)})
        for key, value in ((ClientKey.PROCESS_S, m.process_s), (ClientKey.SETUP_S, m.setup_s)):
            if math.isfinite(value):  # a fresh ClientApp process's age at its reply; model/data load
                rec[key] = round(value, 3)
        for key, opt in ((ClientKey.APP_LOADED_S, m.app_loaded_s), (ClientKey.HANDLER_S, m.handler_s),
                         (ClientKey.PROCESS_CPU_S, m.process_cpu_s), (ClientKey.HANDOFF_S, m.handoff_s)):
            if opt is not None and math.isfinite(opt) and opt >= 0:  # where a deployment's process spent its time
                rec[key] = round(opt, 4)
        if INFO_RECORD in reply.content.config_records:
            info = ReplyInfo.from_config(reply.content[INFO_RECORD])
            rec[ClientKey.WORKER] = info.worker
            if info.quantization != "none":
                rec[ClientKey.QUANTIZATION] = info.quantization
        if self.clock is not None:
            segments = mask_segments(decoded.pruned_at, m.steps) if decoded.pruned_at is not None else None
            fields, status, reason = self.clock.charge(
                sent.client_id, server_round, rank=update.rank, masks=self.client_masks.get(sent.client_id),
                steps=m.steps, tokens=m.tokens, bytes_down=sent.bytes_down,
                bytes_up=reply.content[ARRAYS].count_bytes(), segments=segments)
            rec.update(fields)
            if status is not None:
                rec.update({ClientKey.STATUS: status, ClientKey.REASON: reason})
                return rec, None
        self.trained_rank[sent.client_id] = update.rank
        return rec, update

    def _bounded(self, m: TrainMetrics) -> TrainMetrics:
        """Client-reported figures made safe for the clock and the bandit: steps within what was asked
        (the configured local steps when absent or out of range), tokens within what those steps can
        process, sparsity in [0, 1), non-finite or negative times as NaN (recorded as null)."""
        train = self.experiment.train
        asked = train.local_steps
        steps = m.steps if 1 <= m.steps <= asked else asked
        max_tokens = steps * train.batch_size * self.experiment.model.max_length
        tokens = int(m.tokens) if 0 <= m.tokens <= max_tokens else max_tokens

        def seconds(v: float) -> float:
            return v if math.isfinite(v) and v >= 0 else math.nan

        def fraction(v: float | None) -> float | None:
            return None if v is None else (v if math.isfinite(v) and 0.0 <= v < 1.0 else 0.0)

        return dataclasses.replace(m, steps=steps, tokens=tokens, train_time_s=seconds(m.train_time_s),
                                   setup_s=seconds(m.setup_s), process_s=seconds(m.process_s),
                                   loss_start=m.loss_start if math.isfinite(m.loss_start) else math.nan,
                                   loss_end=m.loss_end if math.isfinite(m.loss_end) else math.nan,
                                   prune_ratio=fraction(m.prune_ratio), param_sparsity=fraction(m.param_sparsity))

    def examples_cap(self, client_id: int) -> int | None:
        """The most examples a client may claim: ``defense.max_examples``, else its partition's size."""
        if self.experiment.defense.max_examples > 0:
            return self.experiment.defense.max_examples
        if self.partition_size is None:
            return None
        if client_id not in self._partition_sizes:
            self._partition_sizes[client_id] = int(self.partition_size(client_id))
        return self._partition_sizes[client_id]

    def bound_updates(self, server_round: int, updates: list[ClientUpdate],
                      records: dict[int, dict[str, Any]]) -> list[ClientUpdate]:
        """Clip or reject updates that move the model further than ``[defense]`` allows.

        An update's size is the L2 norm of its parameter change: its trained factors minus the
        factors it was sent (A and B of every module; a frozen A adds nothing) and, separately,
        its head minus the global head, computed in float64 (finite for any finite float32
        input). Each is bounded by ``norm_multiple`` x the round's median and by ``norm_cap``;
        a clipped update's change is scaled onto the bound (exact clipping in parameter space, as
        DP-FedAvg does; McMahan et al., ICLR 2018), which also bounds its ``||B A||_F``. With
        ``on_excess = "reject"`` the update is dropped instead. Honest updates of one round have
        norms of one order, so the median bound keeps them whole when most clients are honest.
        """
        d = self.experiment.defense
        if not updates or (d.norm_multiple <= 0 and d.norm_cap <= 0):
            return updates
        sent = {s.client_id: s.payload for s in self._sent.values() if s.payload is not None}
        norms = [_change_norms(u, sent.get(u.client_id), self.current) for u in updates]
        kept = []
        bounds = [_bound([n[i] for n in norms], d.norm_multiple, d.norm_cap) for i in (0, 1)]
        for u, (adapter_norm, head_norm) in zip(updates, norms):
            rec = records.get(u.client_id, {})
            rec[ClientKey.UPDATE_NORM], rec[ClientKey.HEAD_NORM] = round(adapter_norm, 6), round(head_norm, 6)
            over = [(what, n, b) for what, n, b in (("adapter", adapter_norm, bounds[0]), ("head", head_norm, bounds[1]))
                    if b is not None and n > b]
            if not over:
                kept.append(u)
                continue
            what = "; ".join(f"{w} change {n:.4g} above the bound {b:.4g}" for w, n, b in over)
            if d.on_excess == "reject":
                rec.update({ClientKey.STATUS: Status.REJECTED, ClientKey.REASON: what})
                log(WARNING, "round %d: rejected update of client %d: %s", server_round, u.client_id, what)
                continue
            scales = [1.0 if bounds[i] is None or norms_i <= bounds[i] else bounds[i] / norms_i
                      for i, norms_i in enumerate((adapter_norm, head_norm))]
            kept.append(_clipped(u, sent.get(u.client_id), self.current, *scales))
            rec[ClientKey.CLIP_SCALE] = round(min(scales), 6)
            log(WARNING, "round %d: clipped update of client %d: %s", server_round, u.client_id, what)
        return kept

    def deploy_rank(self, client_id: int) -> int:
        """The rank a device is deployed at: the rank of its last accepted round (no new policy draw)."""
        return self.trained_rank.get(client_id, self.experiment.lora.rank_for(client_id))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        updates: list[ClientUpdate] = []
        records: list[dict[str, Any]] = []
        bytes_up = 0
        seen = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            seen.add(node)
            if not reply.has_error() and ARRAYS in reply.content.array_records:
                bytes_up += reply.content[ARRAYS].count_bytes()
            rec, update = self._client_record(server_round, node, reply)
            records.append(rec)
            if update is not None:
                updates.append(update)
        for node, sent in self._sent.items():
            if node not in seen:
                timeout = self.experiment.federation.round_timeout_s
                log(WARNING, "round %d: client %d sent no reply within the round timeout (%.0fs); dropped",
                    server_round, sent.client_id, timeout)
                records.append({ClientKey.CLIENT_ID: sent.client_id, ClientKey.NODE_ID: node,
                                ClientKey.RANK: sent.rank, ClientKey.STATUS: Status.FAILED,
                                ClientKey.REASON: "no reply before the round timeout"})
        records += self._prefailed
        by_client = {r[ClientKey.CLIENT_ID]: r for r in records}
        updates = self.bound_updates(server_round, sorted(updates, key=lambda u: u.client_id), by_client)
        if self.clock is not None:
            self.clock.advance(server_round, records)
        records = sorted(records, key=lambda r: r[ClientKey.CLIENT_ID])
        self.after_round(server_round, records)
        result = RoundResult(state=self.current, train_loss=None, clients=records, bytes_up=bytes_up,
                             bytes_down=sum(s.bytes_down for s in self._sent.values()))
        if self.clock is not None:
            result.round_sim_s = self.clock.round_sim_s.get(server_round, 0.0)
            result.sim_time_s = self.clock.sim_time_s
        self._result[server_round] = result
        min_replies = self.experiment.federation.min_replies
        if len(updates) < min_replies:
            log(WARNING, "round %d: %d valid update(s), fewer than federation.min_replies=%d; the global adapter"
                " is unchanged", server_round, len(updates), min_replies)
            return None, None
        updates.sort(key=lambda u: u.client_id)  # reply order varies; aggregation must not (bitwise resume)
        new_state = self.aggregate(updates, self.current)  # rules average each coordinate over its holders
        pending = None
        if self.server_opt is not None and is_finite_adapter(new_state.adapter, new_state.head) is None:
            new_state, pending = self.server_opt.step(self.current, new_state, updates, update_space(self),
                                                      self.global_rank)
        bad = is_finite_adapter(new_state.adapter, new_state.head) or is_finite_adapter(new_state.frozen)
        if bad is not None:
            log(WARNING, "round %d: aggregation produced non-finite %s; keeping the previous adapter", server_round, bad)
            return None, None
        if pending is not None:  # the optimizer's moments advance only with an accepted state
            self.server_opt.commit(pending)
        self.set_state(new_state)
        total = sum(u.num_examples for u in updates)
        train_loss = float(sum(u.train_loss * u.num_examples for u in updates) / total)
        result.state, result.train_loss = new_state, train_loss
        metrics = MetricRecord({"train_loss": train_loss, "num_examples": total, "num_ok": len(updates)})
        return state_to_record(new_state), metrics

    def round_result(self, server_round: int) -> RoundResult:
        """What ``server_round`` produced (after :meth:`aggregate_train`)."""
        return self._result.pop(server_round)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable strategy state saved with every checkpoint (restored on resume): the
        simulated clock, every client's latest pruning masks and the server optimizer's moments."""
        masks = {str(cid): masks_to_bits(cm) for cid, cm in sorted(self.client_masks.items())}
        state = {"sim_time_s": self.clock.sim_time_s if self.clock is not None else 0.0, "client_masks": masks,
                 "trained_rank": {str(cid): r for cid, r in sorted(self.trained_rank.items())}}
        if self.server_opt is not None:
            state["server_opt"] = self.server_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.clock is not None:
            self.clock.sim_time_s = float(state.get("sim_time_s", 0.0))
        self.client_masks = {int(cid): masks_from_bits(bits) for cid, bits in state.get("client_masks", {}).items()}
        self.trained_rank = {int(cid): int(r) for cid, r in state.get("trained_rank", {}).items()}
        if self.server_opt is not None and "server_opt" in state:
            self.server_opt.load_state_dict(state["server_opt"])

    # ------------------------------------------------------------------ federated evaluation

    def evaluates_clients(self, server_round: int) -> bool:
        """Whether ``server_round`` has a federated evaluate phase (``federation.evaluate_clients``,
        every ``evaluate_clients_every`` rounds and in the last round)."""
        fed = self.experiment.federation
        return fed.evaluate_clients > 0 and (server_round % fed.evaluate_clients_every == 0
                                             or server_round == fed.num_rounds)

    def sample_evaluators(self, grid: Grid, server_round: int) -> list[int]:
        """Seeded sample of ``federation.evaluate_clients`` mapped nodes (on a fleet, of the devices
        available this round), drawn from its own stream: training's sample is untouched."""
        self.discover_clients(grid)
        nodes = sorted((n for n in grid.get_node_ids() if n in self.node_clients), key=lambda n: self.node_clients[n])
        if self.fleet is not None:
            nodes = [n for n in nodes if self.fleet.available(self.node_clients[n], server_round)]
        size = min(self.experiment.federation.evaluate_clients, len(nodes))
        return sorted(rng(self.experiment.seed, "evaluate", server_round).sample(nodes, size),
                      key=lambda n: self.node_clients[n])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One EVALUATE message per sampled node: the global adapter at the client's deployed rank,
        the request (setup, rank, client id), and the client's last accepted masks when it prunes
        (it evaluates under its own; these stand in when its node lost them)."""
        self._eval_sent = {}
        if not self.evaluates_clients(server_round):
            return []
        state, fed, exp = record_to_state(arrays), self.experiment.federation, self.experiment
        messages = []
        for node in self.sample_evaluators(grid, server_round):
            cid = self.node_clients[node]
            rank = self.deploy_rank(cid)  # no new policy draw
            payload = state_to_record(self.client_payload(state, cid, rank), fed.transport_down)
            request = TrainRequest(
                server_round=server_round, client_id=cid, rank=rank, seed=derive_seed(exp.seed, "evaluate", server_round, cid),
                setup=client_setup(exp, self.quantization_for(cid, rank)), train_a=self.trains_a,
                gpu_fraction=self.gpu_fraction_for(cid), transport_down=fed.transport_down)
            content = RecordDict({ARRAYS: payload, CONFIG: ConfigRecord({**dict(config), **request.to_config()})})
            if cid in self.client_masks:
                content[MASKS] = ArrayRecord(masks_to_tensors(self.client_masks[cid]))
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                    group_id=str(server_round)))
            self._eval_sent[node] = _Sent(cid, rank, time.time(), payload.count_bytes())
        log(INFO, "configure_evaluate: round %d, %d clients", server_round, len(messages))
        return messages

    def eval_examples_cap(self, client_id: int) -> int | None:
        """The most held-out examples a client can have: its training split t and the fraction f
        give at most max(1, t f / (1 - f)) (:func:`fedtune.data.partition.client_eval_count`)."""
        f = self.experiment.data.client_eval_fraction
        if self.partition_size is None:
            return None
        if client_id not in self._partition_sizes:
            self._partition_sizes[client_id] = int(self.partition_size(client_id))
        return max(1, math.floor(self._partition_sizes[client_id] * f / (1.0 - f) + 1e-9))

    def _eval_record(self, server_round: int, node: int, reply: Message) -> dict[str, Any]:
        """One evaluate reply's record: its metrics when they are well-formed, else why not."""
        sent = self._eval_sent[node]
        rec: dict[str, Any] = {ClientKey.CLIENT_ID: sent.client_id, ClientKey.NODE_ID: node, ClientKey.RANK: sent.rank}
        if self.fleet is not None:
            rec[ClientKey.DEVICE] = self.fleet.device(sent.client_id).name
        if reply.has_error():
            log(WARNING, "round %d: evaluating client %d failed: %s", server_round, sent.client_id, reply.error.reason)
            return {**rec, ClientKey.STATUS: Status.FAILED, ClientKey.REASON: str(reply.error.reason)}
        metric = metric_for_task(self.experiment.model.task).key
        try:
            m = dict(reply.content[METRICS])
            n, loss, value = m["num_examples"], float(m["eval_loss"]), float(m[metric])
            cap = self.eval_examples_cap(sent.client_id)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (cap is not None and n > cap):
                raise ValueError(f"num_examples {n!r} is not a count in [1, {cap or 'inf'}]")
            bounded = 0.0 <= value <= 1.0 if metric == "eval_accuracy" else value >= 1.0
            if not (math.isfinite(loss) and loss >= 0 and math.isfinite(value) and bounded):
                raise ValueError(f"eval_loss {loss} or {metric} {value} out of range")
        except (KeyError, TypeError, ValueError) as exc:
            log(WARNING, "round %d: rejected evaluation of client %d: %s", server_round, sent.client_id, exc)
            return {**rec, ClientKey.STATUS: Status.REJECTED, ClientKey.REASON: f"{type(exc).__name__}: {exc}"}
        rec.update({ClientKey.STATUS: Status.OK, ClientKey.NUM_EXAMPLES: n, "eval_loss": loss, metric: value,
                    "masked": bool(m.get("masked", 0)), ClientKey.REPLY_S: round(time.time() - sent.sent_at, 3)})
        return rec

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every evaluating client (a failed, malformed or missing reply with its status and
        reason); returns the example-weighted means over the accepted ones (None when there are none)."""
        sent = self._eval_sent
        records, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in sent and node not in seen:
                seen.add(node)
                records.append(self._eval_record(server_round, node, reply))
        for node, s in sent.items():
            if node not in seen:
                log(WARNING, "round %d: evaluating client %d sent no reply within the round timeout", server_round,
                    s.client_id)
                records.append({ClientKey.CLIENT_ID: s.client_id, ClientKey.NODE_ID: node, ClientKey.RANK: s.rank,
                                **({ClientKey.DEVICE: self.fleet.device(s.client_id).name} if self.fleet else {}),
                                ClientKey.STATUS: Status.FAILED, ClientKey.REASON: "no reply before the round timeout"})
        self._eval_records = sorted(records, key=lambda r: r[ClientKey.CLIENT_ID])
        overall = client_eval_summary(self._eval_records).get(ALL_DEVICES, {})
        if not overall.get("clients"):
            return None
        return MetricRecord({k: v for k, v in overall.items() if isinstance(v, (int, float))})

    def federated_evaluate(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> list[dict[str, Any]]:
        """The round's evaluate phase on ``grid`` (:meth:`configure_evaluate`, Flower's
        ``send_and_receive`` within ``federation.round_timeout_s``, :meth:`aggregate_evaluate`):
        the per-client records, [] when the round has none."""
        messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord({}), grid))
        if not messages:
            return []
        replies = grid.send_and_receive(messages, timeout=self.experiment.federation.round_timeout_s)
        self.aggregate_evaluate(server_round, replies)
        return self._eval_records


def client_eval_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per device class (``all`` outside a fleet) and over the whole sample (``all``): the clients
    that evaluated (``clients``), those that did not (``failed``), their held-out examples and the
    example-weighted means of ``eval_loss`` and ``eval_accuracy``; for a causal LM the perplexity
    is exp of the weighted mean loss (the perplexity of the pooled examples, per example)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        for key in {r.get(ClientKey.DEVICE) or ALL_DEVICES, ALL_DEVICES}:
            groups.setdefault(key, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for key, rs in sorted(groups.items()):
        ok = [r for r in rs if r.get(ClientKey.STATUS) == Status.OK]
        total = sum(int(r[ClientKey.NUM_EXAMPLES]) for r in ok)
        row: dict[str, Any] = {"clients": len(ok), "failed": len(rs) - len(ok), "num_examples": total}
        if total > 0:
            row["eval_loss"] = sum(r["eval_loss"] * r[ClientKey.NUM_EXAMPLES] for r in ok) / total
            if all("eval_accuracy" in r for r in ok):
                row["eval_accuracy"] = sum(r["eval_accuracy"] * r[ClientKey.NUM_EXAMPLES] for r in ok) / total
            else:
                row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
        out[key] = row
    return out
