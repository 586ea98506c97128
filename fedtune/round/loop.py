"""The server's round loop, shared by ``fedtune simulate`` and ``flwr run``.

Per round: the strategy samples clients and sends each its rank-projected adapter
(``configure_train``), replies are validated and aggregated (``aggregate_train``), the
global adapter is evaluated on the held-out set, one JSON line is appended to
``metrics.jsonl`` and a checkpoint is written (a stopped server resumes from it).
At the end the global adapter is exported in PEFT format to ``adapter/``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedtune.core.config import ExperimentConfig, config_to_toml
from fedtune.data.batching import tokenize
from fedtune.data.partition import cached_federated_data
from fedtune.lora.export import save_peft_adapter
from fedtune.lora.records import state_to_record
from fedtune.models.loading import cached_base_model
from fedtune.pruning.export import export_pruned_model
from fedtune.pruning.structure import model_structure
from fedtune.round.checkpoint import load_checkpoint, save_checkpoint
from fedtune.round.outputs import (
    MetricsWriter,
    format_progress,
    plot_metrics,
    read_metrics,
    summarize,
)
from fedtune.training.local import evaluate_global, head_state, lora_shapes

__all__ = ["run_server"]


def _say(line: str) -> None:
    print(f"[fedtune] {line}", file=sys.stdout, flush=True)


def run_server(grid: Grid, cfg: ExperimentConfig, out_dir: Path, *, resume: bool = False,
               strategy: Any = None) -> dict[str, Any]:
    """Run ``cfg.federation.num_rounds`` rounds on ``grid``; write outputs to ``out_dir``."""
    from strategies.registry import (
        build_strategy,  # strategies depend on fedtune, not the reverse
    )

    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(config_to_toml(cfg))
    torch.manual_seed(cfg.seed)

    strategy = strategy or build_strategy(cfg)
    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
    eval_data = tokenize(fed.eval, base.tokenizer, cfg.model.task, cfg.model.max_length)

    ckpt_dir = out_dir / "checkpoint"
    start_round, elapsed_before = 0, 0.0
    if cfg.prunes or cfg.fleet.devices:
        strategy.structure = model_structure(base.model)
    if cfg.fleet.devices:
        from fedtune.fleet.clock import FleetSimulator

        strategy.fleet = FleetSimulator.from_config(cfg, base.model, strategy.structure)
    if resume and (ckpt_dir / "meta.json").is_file():
        state, meta = load_checkpoint(ckpt_dir)
        start_round, elapsed_before = int(meta["round"]), float(meta.get("wall_time_s", 0.0))
        strategy.load_state_dict(meta.get("strategy", {}))
        _say(f"resuming from checkpoint after round {start_round}")
    else:
        state = strategy.initial_state(lora_shapes(base, cfg), head_state(base))
    strategy.set_state(state)
    writer = MetricsWriter(out_dir / "metrics.jsonl", keep_up_to_round=start_round if start_round else None)
    experiment_toml = config_to_toml(cfg)
    num_rounds = cfg.federation.num_rounds
    _say(f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset}, {cfg.federation.num_clients} clients,"
         f" strategy {type(strategy).__name__}, ranks {sorted(set(cfg.lora.ranks))}, {num_rounds} rounds -> {out_dir}")

    def elapsed() -> float:
        return round(elapsed_before + time.time() - t_start, 3)

    def evaluate(st: Any) -> dict[str, float]:
        t0 = time.time()
        return {**evaluate_global(base, st, eval_data, cfg), "eval_time_s": round(time.time() - t0, 3)}

    if start_round == 0:
        rec = {"round": 0, "wall_time_s": 0.0, **evaluate(state), "bytes_up": 0, "bytes_down": 0, "clients": []}
        if strategy.fleet is not None:
            rec["sim_time_s"] = 0.0
        rec["wall_time_s"] = elapsed()
        writer.write(rec)
        _say(format_progress(rec, num_rounds))

    arrays = state_to_record(state)
    for rnd in range(start_round + 1, num_rounds + 1):
        messages = strategy.configure_train(rnd, arrays, ConfigRecord({"experiment": experiment_toml}), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s)
        new_arrays, agg = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        state = strategy.current  # the decoded global state (unchanged when no update was valid)
        rec = {"round": rnd, "wall_time_s": 0.0}
        if rnd % cfg.federation.evaluate_every == 0 or rnd == num_rounds:
            rec.update(evaluate(state))
        rec["train_loss"] = float(agg["train-loss"]) if agg is not None else None
        rec.update(strategy.round_bytes.get(rnd, {"bytes_up": 0, "bytes_down": 0}))
        rec["clients"] = strategy.round_clients.get(rnd, [])
        if strategy.fleet is not None:
            rec["sim_time_s"] = round(strategy.sim_time_s, 3)
            rec["round_sim_s"] = round(strategy.round_sim_s.get(rnd, 0.0), 3)
        rec["wall_time_s"] = elapsed()
        writer.write(rec)
        save_checkpoint(state, rnd, ckpt_dir, {"wall_time_s": rec["wall_time_s"], "strategy": strategy.state_dict()})
        _say(format_progress(rec, num_rounds))

    adapter_dir = save_peft_adapter(state, cfg, out_dir / "adapter")
    def payload_for(cid: int) -> Any:
        """What client ``cid`` deploys: the global adapter at its last round's rank."""
        return strategy.client_payload(state, cid, strategy.rank_for(cid, num_rounds))

    client_models: dict[str, Any] = {}
    if cfg.prunes and cfg.prune.export_client_models and strategy.client_masks:
        _say(f"exporting {len(strategy.client_masks)} pruned client models to {out_dir / 'clients'}")
        for cid, masks in sorted(strategy.client_masks.items()):
            client_models[str(cid)] = export_pruned_model(payload_for(cid), masks, cfg,
                                                           out_dir / "clients" / str(cid) / "model")
    deployment = None
    if cfg.deploy_sparsity > 0 and strategy.client_masks:
        from fedtune.pruning.completion import deployment_report

        classes = ({cid: strategy.fleet.device(cid).name for cid in strategy.client_masks}
                   if strategy.fleet is not None else {})
        deployment = deployment_report(
            base, cfg, state, strategy.structure, strategy.client_masks, cfg.deploy_sparsity, eval_data,
            payload_for=payload_for,
            classes=classes, evaluate=lambda st, masks: evaluate_global(base, st, eval_data, cfg, masks=masks),
            say=_say, calibration_for=lambda cid: tokenize(fed.partition(cid), base.tokenizer, cfg.model.task,
                                                           cfg.model.max_length))
    records = read_metrics(out_dir / "metrics.jsonl")
    plot = plot_metrics(records, out_dir / "metrics.png", title=f"{cfg.name}: {type(strategy).__name__}")
    summary = summarize(records, {
        "name": cfg.name, "strategy": type(strategy).__name__, "model": cfg.model.name,
        "dataset": cfg.data.dataset, "num_clients": cfg.federation.num_clients,
        "adapter_dir": str(adapter_dir), "plot": str(plot) if plot else None,
        **({"client_models": client_models} if client_models else {}),
        **({"deployment": deployment} if deployment else {}),
    })
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _say(f"done in {summary['wall_time_s']:.1f}s; summary: {out_dir / 'summary.json'}")
    return summary
