"""Per client of an experiment: its label skew, its logit-adjusted loss, its gradient, and how far the
local optimizer moves its adapter from the same starting point under each AdamW epsilon.

Every client starts from the experiment's initial global adapter at one rank and takes ``--steps``
local steps (no federation, no Ray); the bench prints and writes, per client, the share of its
majority label, the loss of its first steps, the root mean square of its first gradient and the
L2 norm of its update (adapter factors and task head) for each ``--adam-eps``. Under AdamW the
update's size hardly depends on the gradient's: a one-class client, whose loss the logit adjustment
already makes near zero, moves as far as a mixed one unless epsilon is comparable to its gradient.

    .venv/bin/python simulations/bench/client_gradients.py [--config simulations/default.toml] \\
        [--rank 8] [--steps 3] [--adam-eps 1e-8 1e-6 1e-5] [--out simulations/results/client-gradients.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def update_norm(start: Any, result: Any) -> float:
    """L2 norm of (result - start) over the adapter factors and the task head."""
    total = 0.0
    for module, (a, b) in result.factors.items():
        a0, b0 = start.adapter[module]
        total += float((a - a0).pow(2).sum()) + float((b - b0).pow(2).sum())
    for name, t in result.head.items():
        total += float((t - start.head[name]).pow(2).sum())
    return total ** 0.5


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "simulations/default.toml")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--adam-eps", type=float, nargs="+", default=[1e-8, 1e-6, 1e-5])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="config overrides")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations/results/client-gradients.json")
    args = ap.parse_args()
    if args.rank < 1 or args.steps < 1:
        ap.error(f"--rank and --steps: must be >= 1, got {args.rank} and {args.steps}")
    if any(e <= 0 for e in args.adam_eps):
        ap.error(f"--adam-eps: every epsilon must be > 0, got {args.adam_eps}")
    return args


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per client: its examples, majority share, first loss and gradient, and its update's
    norm under each epsilon, every run from the same initial adapter."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from tqdm import tqdm

    from fedtune.core.config import load_config
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import head_state, lora_shapes, train_local
    from strategies import HetLoRA

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.extra)
    if cfg.model.task != "classification":
        raise SystemExit(f"{args.config}: the bench measures label skew (a classification task)")
    by_eps = {eps: replace(cfg, train=replace(cfg.train, adam_eps=eps)) for eps in args.adam_eps}
    base = cached_base_model(cfg.model, cfg.seed)
    n = cfg.federation.num_clients
    fed = cached_federated_data(cfg.data, cfg.model.task, n, cfg.seed, cfg.model.num_labels)
    strat = HetLoRA(cfg)
    start = strat.client_payload(strat.initial_state(lora_shapes(base, cfg), head_state(base)), 0, args.rank)
    first_grad: list[float] = []

    def record(opt: Any, *_: Any) -> None:
        if not first_grad:
            g = torch.cat([p.grad.reshape(-1) for grp in opt.param_groups for p in grp["params"] if p.grad is not None])
            first_grad.append(float(g.pow(2).mean().sqrt()))

    rows = []
    hook = register_optimizer_step_pre_hook(record)
    try:
        for cid in tqdm(range(n), desc="clients", unit="client", file=sys.stdout):
            part = tokenize(fed.partition(cid), base.tokenizer, cfg.model.task, cfg.model.max_length)
            labels = list(part.labels or [])
            if not labels:
                raise SystemExit(f"{args.config}: client {cid} has no training examples")
            counts = [labels.count(k) for k in range(cfg.model.num_labels)]
            row: dict[str, Any] = {"client": cid, "examples": len(labels), "majority_share": round(max(counts) / len(labels), 4)}
            for eps, run_cfg in by_eps.items():
                first_grad.clear()
                res = train_local(base, start, args.rank, part, run_cfg, seed=cfg.seed, steps=args.steps)
                row.setdefault("loss_start", round(res.loss_start, 5))
                row.setdefault("grad_rms", float(f"{first_grad[0]:.3e}"))
                row[f"update_norm_eps_{eps:g}"] = round(update_norm(start, res), 4)
            rows.append(row)
    finally:
        hook.remove()
    return rows


def summarise(rows: list[dict[str, Any]], eps_values: list[float]) -> dict[str, Any]:
    """Medians of one-class clients (majority share >= 0.99) against mixed ones (< 0.9)."""
    one_class = [r for r in rows if r["majority_share"] >= 0.99]
    mixed = [r for r in rows if r["majority_share"] < 0.9]
    summary: dict[str, Any] = {}
    if one_class and mixed:
        summary["grad_rms_ratio_mixed_over_one_class"] = round(statistics.median(r["grad_rms"] for r in mixed)
                                                               / statistics.median(r["grad_rms"] for r in one_class), 1)
        for eps in eps_values:
            key = f"update_norm_eps_{eps:g}"
            summary[f"update_ratio_one_class_over_mixed_eps_{eps:g}"] = round(
                statistics.median(r[key] for r in one_class) / statistics.median(r[key] for r in mixed), 3)
    return summary


def main() -> None:
    args = parse_args()
    t0 = time.time()
    rows = measure(args)
    summary = summarise(rows, args.adam_eps)
    out = {"command": "python simulations/bench/client_gradients.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
           "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
           "rank": args.rank, "steps": args.steps, "adam_eps": args.adam_eps, "wall_s": round(time.time() - t0, 1),
           "groups": {"one_class": "majority share >= 0.99", "mixed": "majority share < 0.9"},
           "summary": summary, "clients": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
