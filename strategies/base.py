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
from collections.abc import Iterable
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
from fedtune.core.protocol import (
    ARRAYS,
    CONFIG,
    IDENTIFY,
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
from fedtune.pruning.masks import Masks, mask_segments, masks_from_bits, masks_to_bits
from fedtune.pruning.structure import LayerStructure
from strategies.replies import ReplyDecoder

__all__ = ["LoraStrategy", "RoundResult", "weighted_head_average"]


def weighted_head_average(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Average task-head tensors weighted by ``num_examples`` (FedAvg)."""
    if not updates or not updates[0].head:
        return {}
    total = float(sum(u.num_examples for u in updates))
    return {
        name: sum(u.head[name] * (u.num_examples / total) for u in updates)  # type: ignore[misc]
        for name in updates[0].head
    }


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
    **options:
        Subclass options; anything left over is an error naming the key.
    """

    #: registry name (set by subclasses)
    name: str = "lora-base"
    #: whether clients train A (False for FFA-LoRA, which freezes it)
    trains_a: bool = True

    def __init__(self, experiment: ExperimentConfig, *, global_rank: int | None = None,
                 structure: list[LayerStructure] | None = None, fleet: FleetSimulator | None = None,
                 **options: Any) -> None:
        if options:
            key = sorted(options)[0]
            raise ConfigError(
                f"federation.strategy_args.{key}: unknown option for strategy {type(self).__name__!r}"
            )
        self.experiment = experiment
        self.global_rank = int(global_rank or experiment.lora.max_rank)
        if self.global_rank < 1:
            raise ConfigError(f"federation.strategy_args.global_rank: must be >= 1, got {global_rank}")
        self.structure = structure
        self.fleet = fleet
        self.clock = FleetClock(fleet, experiment.fleet.deadline_s) if fleet is not None else None
        self.node_clients: dict[int, int] = {}  # node id -> client id (partition id)
        self.current: GlobalAdapter | None = None
        self.decoder = ReplyDecoder({}, {}, structure)
        self.server_round = 0  # the round being configured / aggregated
        self.client_masks: dict[int, Masks] = {}  # latest pruning masks each client reported
        self.trained_rank: dict[int, int] = {}  # rank of each client's last accepted round
        self._sent: dict[int, _Sent] = {}  # node -> what was sent to it this round
        self._prefailed: list[dict[str, Any]] = []
        self._result: dict[int, RoundResult] = {}

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
        """Ask unmapped nodes for their client (partition) id with a QUERY message."""
        todo = [n for n in grid.get_node_ids() if n not in self.node_clients]
        if not todo:
            return self.node_clients
        msgs = [
            Message(RecordDict({CONFIG: ConfigRecord({QUERY_KIND: IDENTIFY})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in todo
        ]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                continue
            identity = NodeIdentity.from_config(reply.content[CONFIG])
            self.node_clients[node] = identity.client_id
            if identity.device and self.fleet is not None:
                try:
                    self.fleet.declare(identity.client_id, identity.device)
                except ValueError as exc:
                    log(WARNING, "node %d: %s; using the fleet mix's device", node, exc)
        for i, n in enumerate(sorted(todo)):  # fallback for nodes that did not answer
            self.node_clients.setdefault(n, 10_000 + i)
        return self.node_clients

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
        nodes = sorted(nodes, key=lambda n: self.node_clients[n])
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
            payload = state_to_record(self.client_payload(state, client_id, rank))
            request = ConfigRecord({**dict(config), **self.train_request(client_id, server_round, rank).to_config()})
            messages.append(Message(RecordDict({ARRAYS: payload, CONFIG: request}),
                                    dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
            self._sent[node] = _Sent(client_id, rank, time.time(), payload.count_bytes())
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
            decoded = self.decoder.decode(reply, sent.client_id, sent.rank)
        except (ValueError, RecordError, KeyError, TypeError) as exc:
            rec.update({ClientKey.STATUS: Status.REJECTED, ClientKey.REASON: str(exc)})
            log(WARNING, "round %d: rejected update of client %d: %s", server_round, sent.client_id, exc)
            return rec, None
        update, m = decoded.update, self._bounded(decoded.metrics)
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
        bad = is_finite_adapter(new_state.adapter, new_state.head) or is_finite_adapter(new_state.frozen)
        if bad is not None:
            log(WARNING, "round %d: aggregation produced non-finite %s; keeping the previous adapter", server_round, bad)
            return None, None
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
        simulated clock and every client's latest pruning masks."""
        masks = {str(cid): masks_to_bits(cm) for cid, cm in sorted(self.client_masks.items())}
        return {"sim_time_s": self.clock.sim_time_s if self.clock is not None else 0.0, "client_masks": masks,
                "trained_rank": {str(cid): r for cid, r in sorted(self.trained_rank.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.clock is not None:
            self.clock.sim_time_s = float(state.get("sim_time_s", 0.0))
        self.client_masks = {int(cid): masks_from_bits(bits) for cid, bits in state.get("client_masks", {}).items()}
        self.trained_rank = {int(cid): int(r) for cid, r in state.get("trained_rank", {}).items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """fedtune evaluates the global adapter on the server's held-out set instead."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
