"""Simulation overhead: wall time of the federated rounds against their ideal.

Runs MiniLM on Rotten Tomatoes with 20 clients (all sampled every round) for 3 rounds on
Flower's Ray simulation engine, then compares

    ideal = sum over client-rounds of in-client training time / concurrent workers

with the measured wall time of rounds 1..3 (server-side held-out evaluation excluded, as
it is not client work; the end-to-end ratio, including Ray start-up, model loading and
evaluation, is reported beside it). 1.0 is the limit; the per-worker base-model cache is
what keeps the ratio low, since no client reloads the model.

    .venv/bin/python simulations/bench/overhead.py [--out simulations/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "overhead.json")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from fedtune.core.config import config_from_dict
    from fedtune.engine.simulation import preflight, simulate

    cfg = config_from_dict({"name": "overhead"}, [
        f"federation.num_clients={args.clients}", f"federation.num_rounds={args.rounds}",
        "federation.fraction_train=1.0",
    ])
    run_dir = ROOT / "runs" / f"bench-overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    preflight(cfg)
    simulate(cfg, run_dir)
    end_to_end = time.time() - t0

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["round"] >= 1]
    workers = int((os.cpu_count() or 1) // cfg.simulation.num_cpus_per_client)
    train_s = sum(c["train_time_s"] for r in rounds for c in r["clients"] if c["status"] == "ok")
    ideal = train_s / workers
    rounds_wall = records[-1]["wall_time_s"] - records[0]["wall_time_s"]
    eval_s = sum(r.get("eval_time_s", 0.0) for r in rounds)
    result = {
        "overhead_ratio": round((rounds_wall - eval_s) / ideal, 3),
        "overhead_ratio_end_to_end": round(end_to_end / ideal, 3),
        "ideal_s": round(ideal, 2),
        "rounds_wall_s": round(rounds_wall, 2),
        "server_eval_s": round(eval_s, 2),
        "end_to_end_s": round(end_to_end, 2),
        "sum_client_train_s": round(train_s, 2),
        "client_rounds": sum(len(r["clients"]) for r in rounds),
        "workers": workers,
        "config": {"model": cfg.model.name, "dataset": cfg.data.dataset, "clients": args.clients,
                   "rounds": args.rounds, "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size,
                   "ranks": cfg.lora.ranks, "strategy": cfg.federation.strategy},
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT))
                                         if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"overhead_ratio = {result['overhead_ratio']} (rounds wall {rounds_wall:.1f}s - eval {eval_s:.1f}s)"
          f" / ideal {ideal:.1f}s; end to end {result['overhead_ratio_end_to_end']}")


if __name__ == "__main__":
    main()
