"""The LoRA strategy base: a Flower ``Strategy`` that federates low-rank adapters.

A subclass overrides one pure method, :meth:`LoraStrategy.aggregate_adapters`, which
maps the round's client updates (each at its own rank) to the new global adapter. All
Flower plumbing lives here: per-node messages with each client's rank-projected adapter,
seeded client sampling, decoding and validating replies (malformed, wrongly shaped or
non-finite updates are rejected with the reason logged; a crashed client is recorded as
failed and the round goes on), task-head averaging and per-client bookkeeping that the
server writes to ``metrics.jsonl``.

Adapter conventions are those of :mod:`fedtune.lora.factors` (``delta_W = B @ A``, scale
folded into B).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
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
from fedtune.lora.factors import (
    ClientUpdate,
    Factors,
    GlobalAdapter,
    init_factors,
    is_finite_adapter,
    scale_for_holders,
    truncate_factors,
)
from fedtune.lora.records import (
    RecordError,
    record_to_factors,
    record_to_state,
    state_to_record,
)
from fedtune.pruning.masks import masks_from_tensors
from fedtune.pruning.structure import LayerStructure, Masks, module_keep

__all__ = ["LoraStrategy", "weighted_head_average"]


def weighted_head_average(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Average task-head tensors weighted by ``num_examples`` (FedAvg)."""
    if not updates or not updates[0].head:
        return {}
    total = float(sum(u.num_examples for u in updates))
    return {
        name: sum(u.head[name] * (u.num_examples / total) for u in updates)  # type: ignore[misc]
        for name in updates[0].head
    }


class LoraStrategy(Strategy):
    """Base of every fedtune aggregation rule.

    Parameters
    ----------
    experiment:
        The validated experiment config (ranks, sampling, seed).
    global_rank:
        Rank of the global adapter; defaults to the largest client rank.
    **options:
        Subclass options; anything left over is an error naming the key.
    """

    #: registry name (set by subclasses)
    name: str = "lora-base"
    #: whether clients train A (False for FFA-LoRA, which freezes it)
    trains_a: bool = True

    def __init__(self, experiment: ExperimentConfig, *, global_rank: int | None = None, **options: Any) -> None:
        if options:
            key = sorted(options)[0]
            raise ConfigError(
                f"federation.strategy_args.{key}: unknown option for strategy {type(self).__name__!r}"
            )
        self.experiment = experiment
        self.global_rank = int(global_rank or experiment.lora.max_rank)
        if self.global_rank < 1:
            raise ConfigError(f"federation.strategy_args.global_rank: must be >= 1, got {global_rank}")
        self.node_clients: dict[int, int] = {}  # node id -> client id (partition id)
        self.current: GlobalAdapter | None = None
        self.module_shapes: dict[str, tuple[int, int]] = {}  # module -> (out, in)
        self.head_shapes: dict[str, tuple[int, ...]] = {}
        self.round_clients: dict[int, list[dict[str, Any]]] = {}  # per-round client records
        self.server_round = 0  # the round being configured / aggregated
        self.round_bytes: dict[int, dict[str, int]] = {}
        self._sent: dict[int, tuple[int, int, float]] = {}  # node -> (client id, rank, send time)
        self.structure: list[LayerStructure] | None = None  # prunable structure groups of the model
        self.client_masks: dict[int, Masks] = {}  # latest pruning masks each client reported
        self.fleet: Any = None  # fedtune.fleet.clock.FleetSimulator when a device fleet is simulated
        self.sim_time_s = 0.0  # cumulative simulated seconds
        self.round_sim_s: dict[int, float] = {}
        self._bytes_down: dict[int, int] = {}
        self._prefailed: list[dict[str, Any]] = []

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
        gen = torch.Generator().manual_seed(self.experiment.seed)
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

    # ------------------------------------------------------------------ Flower Strategy API

    def summary(self) -> None:
        log(INFO, "\t├──> %s (fedtune LoRA strategy)", type(self).__name__)
        log(INFO, "\t│\t├── global rank: %d, trains A: %s", self.global_rank, self.trains_a)
        fed = self.experiment.federation
        log(INFO, "\t│\t└── sampling: %s per round", fed.clients_per_round or f"{fed.fraction_train:.0%}")

    def set_state(self, state: GlobalAdapter) -> None:
        self.current = state
        self.module_shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b) in state.adapter.items()}
        self.head_shapes = {k: tuple(v.shape) for k, v in state.head.items()}

    def discover_clients(self, grid: Grid, timeout: float = 120.0) -> dict[int, int]:
        """Ask unmapped nodes for their client (partition) id with a QUERY message."""
        todo = [n for n in grid.get_node_ids() if n not in self.node_clients]
        if not todo:
            return self.node_clients
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"query": "identify"})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in todo
        ]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                continue
            info = reply.content["config"]
            self.node_clients[node] = int(info["client-id"])
            device = str(info.get("device", "") or "")
            if device and self.fleet is not None:
                try:
                    self.fleet.declare(self.node_clients[node], device)
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
        rng = random.Random(self.experiment.seed * 1_000_003 + server_round)
        size = fed.sample_size(len(nodes))
        if self.fleet is not None:  # only devices that take part this round can be sampled
            nodes = [n for n in nodes if self.fleet.available(self.node_clients[n], server_round)]
            size = min(size, len(nodes))
        chosen = rng.sample(nodes, size)
        return sorted(chosen, key=lambda n: self.node_clients[n])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        state = record_to_state(arrays)
        self.set_state(state)
        self.server_round = server_round
        messages = []
        self._sent = {}
        self._bytes_down = {}
        self._prefailed = []
        bytes_down = 0
        for node in self.sample_nodes(grid, server_round):
            client_id = self.node_clients[node]
            rank = self.rank_for(client_id, server_round)
            if self.fleet is not None:
                reason = self.fleet.precheck(client_id, rank, self.client_masks.get(client_id))
                if reason is not None:  # the device could not even start: nothing is sent
                    self._prefailed.append({"client_id": client_id, "node_id": node, "rank": rank, "status": "failed",
                                            "reason": reason, "device": self.fleet.device(client_id).name,
                                            "sim_seconds": 0.0})
                    continue
            payload = state_to_record(self.client_payload(state, client_id, rank))
            cfg = ConfigRecord(dict(config))
            cfg.update({
                "server-round": server_round, "client-id": client_id, "rank": rank,
                "train-a": self.trains_a, "prune-ratio": float(self.prune_ratio_for(client_id, server_round)),
                "quantization": self.quantization_for(client_id, rank),
            })
            fraction = self.gpu_fraction_for(client_id)
            if fraction:
                cfg["gpu-fraction"] = fraction
            self._bytes_down[node] = payload.count_bytes()
            bytes_down += self._bytes_down[node]
            messages.append(Message(RecordDict({"arrays": payload, "config": cfg}),
                                    dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
            self._sent[node] = (client_id, rank, time.time())
        self.round_bytes[server_round] = {"bytes_down": bytes_down, "bytes_up": 0}
        log(INFO, "configure_train: round %d, %d clients, ranks %s", server_round, len(messages),
            sorted({r for _, r, _ in self._sent.values()}))
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

    def _sent_info(self, node: int) -> tuple[int, int, float]:
        """(client id, rank, send time) of the message sent to ``node`` this round (rank -1: none sent)."""
        return self._sent.get(node, (self.node_clients.get(node, -1), -1, 0.0))

    def decode_reply(self, reply: Message) -> ClientUpdate:
        """Decode and validate one reply; raises ValueError with the reason to reject it."""
        node = reply.metadata.src_node_id
        client_id, rank, _ = self._sent_info(node)
        if "arrays" not in reply.content.array_records or "metrics" not in reply.content.metric_records:
            raise ValueError("reply lacks the 'arrays' or 'metrics' record")
        factors, head = record_to_factors(reply.content["arrays"])
        metrics = dict(reply.content["metrics"])
        expected = set(self.current.adapter) if self.current else set()
        if set(factors) != expected:
            missing, extra = sorted(expected - set(factors)), sorted(set(factors) - expected)
            raise ValueError(f"adapter modules differ from the global adapter's (missing {missing[:2]}, extra {extra[:2]})")
        for m, (a, b) in factors.items():
            out_f, in_f = self.module_shapes[m]
            if a.shape != (rank, in_f) or b.shape != (out_f, rank):
                raise ValueError(
                    f"{m}: A {tuple(a.shape)}, B {tuple(b.shape)}; expected ({rank}, {in_f}) and ({out_f}, {rank})"
                )
        if set(head) != set(self.head_shapes) or any(tuple(head[k].shape) != self.head_shapes[k] for k in head):
            raise ValueError("task head tensors differ in names or shapes from the global head")
        bad = is_finite_adapter(factors, head)
        if bad is not None:
            raise ValueError(f"non-finite values in {bad}")
        n = int(metrics.get("num-examples", 0))
        if n <= 0:
            raise ValueError(f"num-examples must be positive, got {n}")
        loss = float(metrics.get("train-loss", math.nan))
        keep: dict[str, tuple[str, torch.Tensor]] = {}
        if "masks" in reply.content.array_records:
            masks = self._decode_masks(reply.content["masks"])
            keep = {m: k for m, k in module_keep(self.structure or [], masks).items() if m in factors}
            for m, (how, vec) in keep.items():
                size = factors[m][1].shape[0] if how == "rows" else factors[m][0].shape[1]
                if vec.numel() != size:
                    raise ValueError(f"pruning mask of {m} has {vec.numel()} entries for {size} {how}")
            self.client_masks[client_id] = masks
        return ClientUpdate(client_id=client_id, rank=rank, factors=factors, head=head, num_examples=n,
                            train_loss=loss, metrics={k: float(v) for k, v in metrics.items()
                                                      if isinstance(v, (int, float))}, keep=keep)

    def _decode_masks(self, record: ArrayRecord) -> Masks:
        if self.structure is None:
            raise ValueError("client sent pruning masks but the server knows no model structure")
        try:
            masks = masks_from_tensors(record.to_torch_state_dict())
        except (ValueError, KeyError) as exc:
            raise ValueError(f"malformed pruning masks: {exc}") from exc
        for ls in self.structure:
            m = masks.get(ls.layer, {})
            if set(m) != {"attn", "ffn"} or m["attn"].shape != (ls.num_units,) or m["ffn"].shape != (ls.ffn_dim,):
                raise ValueError(f"pruning masks of layer {ls.layer} do not match the model's structure")
        return masks

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
            client_id, rank, sent_at = self._sent_info(node)
            rec: dict[str, Any] = {"client_id": client_id, "node_id": node, "rank": rank}
            if self.fleet is not None:
                rec["device"] = self.fleet.device(client_id).name
            if reply.has_error():
                rec.update(status="failed", reason=str(reply.error.reason))
                log(WARNING, "round %d: client %d failed: %s", server_round, client_id, reply.error.reason)
                records.append(rec)
                continue
            try:
                if "arrays" in reply.content.array_records:
                    bytes_up += reply.content["arrays"].count_bytes()
                update = self.decode_reply(reply)
            except (ValueError, RecordError, KeyError, TypeError) as exc:
                rec.update(status="rejected", reason=str(exc))
                log(WARNING, "round %d: rejected update of client %d: %s", server_round, client_id, exc)
                records.append(rec)
                continue
            rec.update(status="ok", train_loss=update.train_loss, num_examples=update.num_examples,
                       prune_ratio=update.metrics.get("prune-ratio", 0.0),
                       loss_start=update.metrics.get("loss-start", math.nan),
                       loss_end=update.metrics.get("loss-end", math.nan),
                       train_time_s=update.metrics.get("train-time-s", math.nan),
                       reply_s=round(time.time() - sent_at, 3))
            for key in ("process-s", "setup-s"):  # a fresh ClientApp process's age at its reply; model/data load
                value = update.metrics.get(key, math.nan)
                if math.isfinite(value):
                    rec[key.replace("-", "_")] = round(value, 3)
            if "info" in reply.content.config_records:
                info = reply.content["info"]
                rec["worker"] = str(info.get("worker", ""))
                if str(info.get("quantization", "none")) != "none":
                    rec["quantization"] = str(info["quantization"])
            if self.fleet is not None and not self._simulate_cost(server_round, node, update, rec, reply):
                records.append(rec)
                continue
            updates.append(update)
            records.append(rec)
        for node, (client_id, rank, _) in self._sent.items():
            if node not in seen:
                timeout = self.experiment.federation.round_timeout_s
                log(WARNING, "round %d: client %d sent no reply within the round timeout (%.0fs); dropped",
                    server_round, client_id, timeout)
                records.append({"client_id": client_id, "node_id": node, "rank": rank,
                                "status": "failed", "reason": "no reply before the round timeout"})
        records += self._prefailed
        if self.fleet is not None:
            self._advance_clock(server_round, records)
        self.round_clients[server_round] = sorted(records, key=lambda r: r["client_id"])
        self.after_round(server_round, self.round_clients[server_round])
        self.round_bytes.setdefault(server_round, {"bytes_down": 0})["bytes_up"] = bytes_up
        min_replies = self.experiment.federation.min_replies
        if len(updates) < min_replies:
            log(WARNING, "round %d: %d valid update(s), fewer than federation.min_replies=%d; the global adapter"
                " is unchanged", server_round, len(updates), min_replies)
            return None, None
        updates.sort(key=lambda u: u.client_id)  # reply order varies; aggregation must not (bitwise resume)
        new_state = self.aggregate(scale_for_holders(updates), self.current)
        bad = is_finite_adapter(new_state.adapter, new_state.head) or is_finite_adapter(new_state.frozen)
        if bad is not None:
            log(WARNING, "round %d: aggregation produced non-finite %s; keeping the previous adapter", server_round, bad)
            return None, None
        self.set_state(new_state)
        total = sum(u.num_examples for u in updates)
        metrics = MetricRecord({
            "train-loss": float(sum(u.train_loss * u.num_examples for u in updates) / total),
            "num-examples": total,
            "num-ok": len(updates),
        })
        return state_to_record(new_state), metrics

    def _simulate_cost(self, server_round: int, node: int, update: ClientUpdate, rec: dict[str, Any],
                       reply: Message) -> bool:
        """Cost of an ok client-round on its device; False if it ran out of memory or missed the deadline."""
        cost = self.fleet.cost(
            update.client_id, server_round, rank=update.rank, masks=self.client_masks.get(update.client_id),
            steps=int(update.metrics.get("steps", self.experiment.train.local_steps)),
            tokens=int(update.metrics.get("tokens", 0)), bytes_down=self._bytes_down.get(node, 0),
            bytes_up=reply.content["arrays"].count_bytes())
        rec.update(device=self.fleet.device(update.client_id).name, sim_seconds=round(cost.total_s, 3),
                   sim_compute_s=round(cost.compute_s, 3), sim_comm_s=round(cost.comm_s, 3),
                   peak_mem_gb=round(cost.peak_mem_gb, 3))
        deadline = self.experiment.fleet.deadline_s
        if cost.oom:
            rec.update(status="failed", reason=f"out of memory on {rec['device']}: needs {cost.peak_mem_gb:.2f} GB")
            return False
        if deadline and cost.total_s > deadline:
            rec.update(status="dropped", reason=f"missed the deadline: {cost.total_s:.1f}s > {deadline:.1f}s")
            return False
        return True

    def _advance_clock(self, server_round: int, records: list[dict[str, Any]]) -> None:
        """A synchronous round lasts as long as its slowest survivor, or the deadline if any was dropped."""
        survivors = [r["sim_seconds"] for r in records if r["status"] == "ok" and "sim_seconds" in r]
        deadline = self.experiment.fleet.deadline_s
        length = max(survivors, default=0.0)
        if deadline and any(r["status"] == "dropped" for r in records):
            length = deadline
        self.round_sim_s[server_round] = length
        self.sim_time_s += length

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable strategy state saved with every checkpoint (restored on resume): the
        simulated clock and every client's latest pruning masks (as '0'/'1' strings, 1 = kept)."""
        masks = {str(cid): {str(layer): {k: "".join("1" if b else "0" for b in t.tolist()) for k, t in m.items()}
                            for layer, m in cm.items()} for cid, cm in sorted(self.client_masks.items())}
        return {"sim_time_s": self.sim_time_s, "client_masks": masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim_time_s = float(state.get("sim_time_s", 0.0))
        self.client_masks = {
            int(cid): {int(layer): {k: torch.tensor([c == "1" for c in bits], dtype=torch.bool) for k, bits in m.items()}
                       for layer, m in cm.items()} for cid, cm in state.get("client_masks", {}).items()}

    def after_round(self, server_round: int, records: list[dict[str, Any]]) -> None:
        """Called with the round's per-client records (outcomes) after aggregation; a hook for policies."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """fedtune evaluates the global adapter on the server's held-out set instead."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

