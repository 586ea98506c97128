"""The server's round loop, shared by ``fedtune simulate`` and ``flwr run``.

Phases, each one function: :func:`setup` (base model, held-out data, the model's prunable
structure, the simulated fleet, the strategy with those collaborators), :func:`restore`
(round 0 or the checkpoint), :func:`train` (the rounds) and :func:`finish` (exports and the
summary). Per round the strategy samples clients and sends each its rank-projected adapter
(``configure_train``), validates and aggregates the replies (``aggregate_train``) and hands
back a :class:`~strategies.base.RoundResult`; the loop evaluates the global adapter on the
held-out set (and, in rounds with a federated evaluate phase, has sampled clients score it on their
own held-out splits: ``client_eval``), appends one JSON line to ``metrics.jsonl`` and writes a checkpoint (a stopped
server resumes from it); the round's scalars go to the run's trackers (:mod:`fedtune.tracking`)
and, every ``outputs.adapter_every`` rounds, the global adapter to ``adapter/round-N/``. At the
end the global adapter is exported in PEFT format to ``adapter/``, pruned per-device models to
``clients/``, and ``summary.json`` is written. Progress goes to the ``fedtune.round`` logger and
``run.log``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedtune.core.config import ConfigError, ExperimentConfig, config_to_toml
from fedtune.core.metric import masked, metric_for_task
from fedtune.core.protocol import ClientKey, RoundKey
from fedtune.data.batching import Tokenized, tokenize
from fedtune.data.partition import FederatedData, cached_federated_data
from fedtune.fleet.clock import FleetSimulator
from fedtune.lora.export import (
    remove_round_adapters,
    round_adapter_dir,
    save_peft_adapter,
)
from fedtune.lora.factors import GlobalAdapter
from fedtune.lora.records import state_to_record
from fedtune.models.loading import BaseModel, cached_base_model
from fedtune.pruning.completion import deployment_report
from fedtune.pruning.export import export_pruned_model
from fedtune.pruning.masks import Masks
from fedtune.pruning.structure import LayerStructure, model_structure
from fedtune.round.checkpoint import (
    config_hash,
    load_checkpoint,
    read_checkpoint_meta,
    remove_checkpoint,
    save_checkpoint,
)
from fedtune.round.outputs import (
    MetricsWriter,
    format_progress,
    plot_metrics,
    provenance,
    read_metrics,
    summarize,
)
from fedtune.tracking import RunTrackers, ensure_logging, run_log
from fedtune.training.local import evaluate_global, head_state, lora_shapes
from strategies.base import CLIENT_EVAL, LoraStrategy, client_eval_summary
from strategies.registry import build_strategy

__all__ = ["run_server", "ServerRun", "setup", "resume_meta", "restore", "train", "finish"]


LOG = logging.getLogger("fedtune.round")


def _say(line: str) -> None:
    LOG.info(line)


@dataclass
class ServerRun:
    """Everything a run's server holds between phases."""

    cfg: ExperimentConfig
    out_dir: Path
    base: BaseModel
    fed: FederatedData
    eval_data: Tokenized
    structure: list[LayerStructure] | None
    fleet: FleetSimulator | None
    strategy: LoraStrategy
    t_start: float
    elapsed_before: float = 0.0  # wall seconds of earlier sessions (resume)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.time() - self.t_start, 3)

    def evaluate(self, state: GlobalAdapter, masks: Masks | None = None) -> dict[str, float]:
        t0 = time.time()
        metrics = evaluate_global(self.base, state, self.eval_data, self.cfg, masks=masks)
        return metrics if masks is not None else {**metrics, RoundKey.EVAL_TIME_S: round(time.time() - t0, 3)}


def setup(cfg: ExperimentConfig, out_dir: Path) -> ServerRun:
    """Load the base model and held-out data; build the structure, the fleet and the strategy."""
    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(config_to_toml(cfg))
    torch.manual_seed(cfg.seed)
    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
    eval_data = tokenize(fed.eval, base.tokenizer, cfg.model.task, cfg.model.max_length)
    structure = model_structure(base.model) if (cfg.prunes or cfg.fleet.devices) else None
    fleet = FleetSimulator.from_config(cfg, base.model, structure) if cfg.fleet.devices and structure is not None else None
    strategy = build_strategy(cfg, structure=structure, fleet=fleet,
                              partition_size=fed.partition_size)
    return ServerRun(cfg, out_dir, base, fed, eval_data, structure, fleet, strategy, t_start)


def resume_meta(cfg: ExperimentConfig, out_dir: Path, resume: bool, force: bool = False) -> dict[str, Any] | None:
    """The metadata of the checkpoint a run in ``out_dir`` resumes from, or None when it starts at
    round 0 (not ``resume``, or no committed checkpoint).

    A checkpoint written under a different experiment config
    (:func:`~fedtune.round.checkpoint.config_hash`) is refused with a
    :class:`~fedtune.core.config.ConfigError` unless ``force``; so is an unreadable one (the old
    layout, a ``LATEST`` naming a missing round).
    """
    if not resume:
        return None
    try:
        meta = read_checkpoint_meta(out_dir / "checkpoint")
    except FileNotFoundError:
        return None
    if meta.get("config_hash") != config_hash(cfg) and not force:
        raise ConfigError(f"resume: the checkpoint in {out_dir} was written under a different experiment"
                          " config than this one; pass force to resume anyway")
    return meta


def restore(run: ServerRun, resume: bool, force: bool = False) -> tuple[GlobalAdapter, int]:
    """The global state to start from and the last finished round (0 for a new run).

    With ``resume`` and a committed checkpoint the run continues from it (checked by
    :func:`resume_meta`). Otherwise the run starts at round 0 and removes the checkpoint an earlier
    run left in the directory, which a new run must not be mixed with (:func:`train` truncates
    ``metrics.jsonl``). ``summary.json``, the mark of a finished run, is removed in both cases
    (:func:`finish` writes it again).
    """
    (run.out_dir / "summary.json").unlink(missing_ok=True)
    if resume_meta(run.cfg, run.out_dir, resume, force) is not None:
        state, meta = load_checkpoint(run.ckpt_dir)
        if meta.get("config_hash") != config_hash(run.cfg):
            _say(f"resuming {run.out_dir} under a different experiment config (forced)")
        start_round, run.elapsed_before = int(meta["round"]), float(meta.get("wall_time_s", 0.0))
        run.strategy.load_state_dict(meta.get("strategy", {}))
        _say(f"resuming from checkpoint after round {start_round}")
    else:
        if resume:
            _say(f"no checkpoint in {run.out_dir}: starting at round 0")
        remove_checkpoint(run.ckpt_dir)
        state, start_round = run.strategy.initial_state(lora_shapes(run.base, run.cfg), head_state(run.base)), 0
    run.strategy.set_state(state)
    return state, start_round


def masked_evaluation(run: ServerRun, state: GlobalAdapter, rec: dict[str, Any], sampled: list[int]) -> dict[str, Any]:
    """The round's metric under devices' pruning masks (``federation.masked_eval_*``): the mean over
    the panel, or over the first sampled devices that have masks; a device without masks counts at
    the unmasked value (it deploys the dense model). Empty when clients do not prune."""
    fc = run.cfg.federation
    if not run.cfg.prunes or not (fc.masked_eval_clients or fc.masked_eval_panel):
        return {}
    masks_by_client = run.strategy.client_masks
    ids = list(fc.masked_eval_panel) or [c for c in sorted(sampled) if c in masks_by_client][:fc.masked_eval_clients]
    metric = metric_for_task(run.cfg.model.task)
    values, losses = [], []
    for cid in ids:
        scores = run.evaluate(state, masks_by_client[cid]) if cid in masks_by_client else rec
        values.append(scores[metric.key])
        losses.append(scores[RoundKey.EVAL_LOSS])
    if not ids:
        values, losses = [rec[metric.key]], [rec[RoundKey.EVAL_LOSS]]
    return {masked(metric).key: sum(values) / len(values), RoundKey.MASKED_EVAL_LOSS: sum(losses) / len(losses),
            RoundKey.MASKED_EVAL_CLIENTS: ids}


def _round_done(run: ServerRun, rec: dict[str, Any], state: GlobalAdapter, trackers: RunTrackers | None) -> None:
    """After a round's record is written: its progress line, its clients (DEBUG), the trackers'
    scalars, and the global adapter when ``outputs.adapter_every`` asks for this round."""
    rnd, every = rec[RoundKey.ROUND], run.cfg.outputs.adapter_every
    _say(format_progress(rec, run.cfg.federation.num_rounds))
    for c in rec.get(RoundKey.CLIENTS, []):
        LOG.debug("round %d: client %s: %s", rnd, c.get(ClientKey.CLIENT_ID),
                  ", ".join(f"{k} {v}" for k, v in c.items() if k != ClientKey.CLIENT_ID))
    if trackers is not None:
        trackers.log_round(rec)
    if every and rnd > 0 and rnd % every == 0:
        path = save_peft_adapter(state, run.cfg, round_adapter_dir(run.out_dir / "adapter", rnd))
        LOG.debug("round %d: global adapter exported to %s", rnd, path)


def train(grid: Grid, run: ServerRun, state: GlobalAdapter, start_round: int,
          trackers: RunTrackers | None = None) -> GlobalAdapter:
    """Rounds ``start_round + 1 .. num_rounds``: one metrics line and one checkpoint each; each
    round's scalars go to ``trackers``."""
    cfg, strategy = run.cfg, run.strategy
    num_rounds = cfg.federation.num_rounds
    cfg_hash = config_hash(cfg)
    writer = MetricsWriter(run.out_dir / "metrics.jsonl", keep_up_to_round=start_round if start_round else None)
    remove_round_adapters(run.out_dir / "adapter", start_round)  # rounds this run trains (again)
    _say(f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset}, {cfg.federation.num_clients} clients,"
         f" strategy {type(strategy).__name__}, ranks {sorted(set(cfg.lora.ranks))}, {num_rounds} rounds"
         f" -> {run.out_dir}")
    if start_round == 0:
        rec = {RoundKey.ROUND: 0, RoundKey.WALL_TIME_S: 0.0, **run.evaluate(state), RoundKey.BYTES_UP: 0,
               RoundKey.BYTES_DOWN: 0, RoundKey.CLIENTS: []}
        rec.update(masked_evaluation(run, state, rec, []))
        if run.fleet is not None:
            rec[RoundKey.SIM_TIME_S] = 0.0
        rec[RoundKey.WALL_TIME_S] = run.elapsed()
        writer.write(rec)
        _round_done(run, rec, state, trackers)
    arrays = state_to_record(state)
    for rnd in range(start_round + 1, num_rounds + 1):
        messages = strategy.configure_train(rnd, arrays, ConfigRecord({}), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        result = strategy.round_result(rnd)
        state = result.state
        rec = {RoundKey.ROUND: rnd, RoundKey.WALL_TIME_S: 0.0}
        if rnd % cfg.federation.evaluate_every == 0 or rnd == num_rounds:
            rec.update(run.evaluate(state))
            rec.update(masked_evaluation(run, state, rec, [c[ClientKey.CLIENT_ID] for c in result.clients]))
        rec.update({RoundKey.TRAIN_LOSS: result.train_loss, RoundKey.BYTES_UP: result.bytes_up,
                    RoundKey.BYTES_DOWN: result.bytes_down, RoundKey.CLIENTS: result.clients})
        if client_evals := strategy.federated_evaluate(grid, rnd, arrays):  # Flower's evaluate phase
            rec[CLIENT_EVAL] = client_evals
        if run.fleet is not None:
            rec[RoundKey.SIM_TIME_S] = round(result.sim_time_s or 0.0, 3)
            rec[RoundKey.ROUND_SIM_S] = round(result.round_sim_s or 0.0, 3)
        rec[RoundKey.WALL_TIME_S] = run.elapsed()
        writer.write(rec)
        save_checkpoint(state, rnd, run.ckpt_dir, {"config_hash": cfg_hash, "wall_time_s": rec[RoundKey.WALL_TIME_S],
                                                   "strategy": strategy.state_dict()})
        _round_done(run, rec, state, trackers)
    return state


def _deploy_devices(run: ServerRun, state: GlobalAdapter) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Pruned per-device models (``clients/<id>/model``) and the deployment report."""
    cfg, strategy = run.cfg, run.strategy
    masks_by_client = strategy.client_masks

    def payload_for(cid: int) -> GlobalAdapter:
        """What client ``cid`` deploys: the global adapter at the rank it last trained at."""
        return strategy.client_payload(state, cid, strategy.deploy_rank(cid))

    client_models: dict[str, Any] = {}
    if cfg.prunes and cfg.prune.export_client_models and masks_by_client:
        _say(f"exporting {len(masks_by_client)} pruned client models to {run.out_dir / 'clients'}")
        for cid, masks in sorted(masks_by_client.items()):
            client_models[str(cid)] = export_pruned_model(payload_for(cid), masks, cfg,
                                                           run.out_dir / "clients" / str(cid) / "model")
    if not (cfg.deploy_sparsity > 0 and masks_by_client):
        return client_models, None
    classes = {cid: run.fleet.device(cid).name for cid in masks_by_client} if run.fleet is not None else {}
    deployment = deployment_report(
        run.base, cfg, state, run.structure, masks_by_client, cfg.deploy_sparsity, run.eval_data,
        payload_for=payload_for, classes=classes, evaluate=lambda st, masks: run.evaluate(st, masks),
        say=_say, calibration_for=lambda cid: tokenize(run.fed.partition(cid), run.base.tokenizer, cfg.model.task,
                                                       cfg.model.max_length))
    return client_models, deployment


def final_client_eval(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``client_eval`` of summary.json: the last federated evaluation's round and its example-weighted
    means per device class (:func:`~strategies.base.client_eval_summary`); empty when there was none."""
    last = next((r for r in reversed(records) if r.get(CLIENT_EVAL)), None)
    if last is None:
        return {}
    return {CLIENT_EVAL: {"round": last[RoundKey.ROUND], "by_device": client_eval_summary(last[CLIENT_EVAL])}}


def finish(run: ServerRun, state: GlobalAdapter) -> dict[str, Any]:
    """Export the adapter and per-device models, plot, and write ``summary.json``."""
    cfg = run.cfg
    adapter_dir = save_peft_adapter(state, cfg, run.out_dir / "adapter")
    client_models, deployment = _deploy_devices(run, state)
    records = read_metrics(run.out_dir / "metrics.jsonl")
    name = type(run.strategy).__name__
    plot = plot_metrics(records, run.out_dir / "metrics.png", title=f"{cfg.name}: {name}")
    summary = summarize(records, {
        "name": cfg.name, "strategy": name, "model": cfg.model.name,
        "dataset": cfg.data.dataset, "num_clients": cfg.federation.num_clients,
        "adapter_dir": str(adapter_dir), "plot": str(plot) if plot else None,
        **({"client_models": client_models} if client_models else {}),
        **({"deployment": deployment} if deployment else {}),
        **final_client_eval(records),
        "provenance": provenance(),
    })
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _say(f"done in {summary['wall_time_s']:.1f}s; summary: {run.out_dir / 'summary.json'}")
    return summary


def run_server(grid: Grid, cfg: ExperimentConfig, out_dir: Path, *, resume: bool = False,
               force: bool = False) -> dict[str, Any]:
    """Run ``cfg.federation.num_rounds`` rounds on ``grid``; write outputs to ``out_dir``.

    ``resume`` continues from ``out_dir``'s checkpoint; ``force`` lets it continue one written under
    a different experiment config (see :func:`restore`).
    """
    resume_meta(cfg, out_dir, resume, force)  # a refused resume leaves the run's config.toml as it was
    ensure_logging()
    with run_log(out_dir):  # a no-op when the CLI copies this process's log there already
        run = setup(cfg, out_dir)
        state, start_round = restore(run, resume, force)
        with RunTrackers.open(cfg, out_dir) as trackers:
            state = train(grid, run, state, start_round, trackers)
        return finish(run, state)
