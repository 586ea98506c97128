"""Per-round client overhead in a real Flower deployment, before and after the persistent worker.

A SuperNode starts a fresh ClientApp process for every message. Without a worker that
process imports torch, transformers and peft and rebuilds the model and data before it can
train; with ``client-worker=true`` (fedtune's default in deployment) it stays light and hands
the message to the node's persistent worker (clients/worker.py). Both runs use the same
topology (`fedtune deploy`: SuperLink + 3 SuperNodes as processes on 127.0.0.1, TLS and
SuperNode auth on), the same experiment (simulations/deploy.toml), one after the other.

client overhead of a client-round = the ClientApp process's age when its reply is ready
minus the training time inside it (what the process costs beyond training). Reported as
the mean over client-rounds after the first round (steady state; the first round also starts
the workers) and over all rounds; plus the server-side round time (send to last reply).

    .venv/bin/python simulations/bench/deploy_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def measure(worker: bool, rounds: int, out: Path) -> dict:
    import dataclasses

    from fedtune.core.config import load_config
    from fedtune.deploy.processes import deploy

    cfg = load_config(ROOT / "simulations" / "deploy.toml")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, num_rounds=rounds))
    t0 = time.time()
    status, _ = deploy(cfg, out / "run", out / "deployment", worker=worker, say=lambda s: print(s, flush=True))
    if status != "finished:completed":
        raise SystemExit(f"deployment run ended {status}; logs in {out / 'deployment' / 'logs'}")
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [(r["round"], c) for r in records for c in r["clients"] if c["status"] == "ok"]
    steady = [c["process_s"] - c["train_time_s"] for rnd, c in rows if rnd > 1]
    every = [c["process_s"] - c["train_time_s"] for _, c in rows]
    round_s = [max(c["reply_s"] for c in r["clients"]) for r in records if r["clients"]]
    return {
        "client_overhead_s": round(statistics.mean(steady), 3),
        "client_overhead_s_all_rounds": round(statistics.mean(every), 3),
        "train_time_s": round(statistics.mean(c["train_time_s"] for _, c in rows), 3),
        "setup_s_per_round": [round(statistics.mean(c.get("setup_s", 0.0) for rnd, c in rows if rnd == k), 3)
                              for k in range(1, rounds + 1)],
        "round_s_steady": round(statistics.mean(round_s[1:]), 3),
        "round_s_per_round": [round(x, 3) for x in round_s],
        "client_rounds": len(rows), "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "deploy_overhead.json")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    before = measure(False, args.rounds, ROOT / "runs" / f"bench-deploy-before-{stamp}")
    after = measure(True, args.rounds, ROOT / "runs" / f"bench-deploy-after-{stamp}")
    result = {
        "client_overhead_s_before": before["client_overhead_s"],
        "client_overhead_s_after": after["client_overhead_s"],
        "overhead_ratio_before_over_after": round(before["client_overhead_s"] / after["client_overhead_s"], 2),
        "round_s_before": before["round_s_steady"], "round_s_after": after["round_s_steady"],
        "before": before, "after": after,
        "setup": "fedtune deploy: SuperLink + 3 SuperNodes as processes on 127.0.0.1, TLS + SuperNode auth,"
                 " simulations/deploy.toml (tiny-bert, FedSpine); before = per-message ClientApp processes"
                 " (--no-worker), after = persistent per-node worker (default)",
        "command": "python simulations/bench/deploy_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
