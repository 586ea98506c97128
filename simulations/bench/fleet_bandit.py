"""FedSpine's comparison on a simulated fleet: simulated time to a target accuracy for the
S-UCB bandit against static-by-device-class, random and UCB1 assignments.

MiniLM on Rotten Tomatoes (Dirichlet label skew), the FedSpine testbed mix (30 Jetson TX2,
40 Xavier NX, 10 AGX Xavier; ``--scale`` shrinks it), a fraction of the fleet sampled per
round, clients really pruning. Every method uses ``policy.ratio_mode = "step"``: an arm's
ratio is how much further a client prunes this round, capped at the common target
sparsity (arms: a step of 0.15 or 0.3, so two visits reach the target 0.3 whatever is chosen),
so all methods head for the same final sparsity (reported). Each method runs as
its own ``fedtune simulate`` process with the same seed (same sampling and availability).

    .venv/bin/python simulations/bench/fleet_bandit.py                    # the full 80-device fleet
    .venv/bin/python simulations/bench/fleet_bandit.py --scale 0.25 --rounds 8 --out simulations/results/fleet_bandit_reduced.json
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

import tomli_w

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = {
    "s-ucb": {"name": "s-ucb"},
    # the hand-tuned static baseline: slower classes prune faster and train a smaller rank
    "static-by-class": {"name": "static", "args": {"arms": {
        "jetson-tx2": [0.3, 4], "jetson-xavier-nx": [0.15, 8], "jetson-agx-xavier": [0.15, 16]}}},
    "random": {"name": "random"},
    "ucb1": {"name": "ucb1"},
}


def experiment(args: argparse.Namespace, method: str) -> dict:
    mix = {"jetson-tx2": 30, "jetson-xavier-nx": 40, "jetson-agx-xavier": 10}
    devices = {k: max(1, round(v * args.scale)) for k, v in mix.items()}
    n = sum(devices.values())
    return {
        "name": f"fleet-bandit-{method}", "seed": args.seed,
        "model": {"name": "minilm"},
        "data": {"partitioner_args": {"alpha": 1.0, "min_partition_size": 10}},
        "train": {"local_steps": args.local_steps},
        "prune": {"interval": max(1, args.local_steps // 2), "export_client_models": False},
        "federation": {"num_clients": n, "num_rounds": args.rounds, "fraction_train": args.fraction,
                       "strategy": "fedspine"},
        "fleet": {"devices": devices},
        "policy": {"ratios": [0.15, 0.3], "ranks": [4, 8, 16], "target_sparsity": args.target_sparsity,
                   "ratio_mode": "step", **METHODS[method]},
    }


TARGETS = (0.6, 0.65, 0.7, 0.75)


def summarize(run_dir: Path, target: float) -> dict:
    from fedtune.clock import time_to_target

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_sparsity: dict[int, float] = {}
    for rec in records:
        for c in rec["clients"]:
            if c["status"] == "ok":
                last_sparsity[c["client_id"]] = c.get("prune_ratio", 0.0)
    return {
        "time_to_target_s": time_to_target(records, target),
        "time_to_targets_s": {str(a): time_to_target(records, a) for a in TARGETS},
        "accuracy_by_round": [r.get("eval_accuracy") for r in records],
        "final_accuracy": records[-1].get("eval_accuracy"),
        "best_accuracy": max(r.get("eval_accuracy") or 0 for r in records),
        "sim_time_s": records[-1].get("sim_time_s"),
        "mean_final_sparsity": round(sum(last_sparsity.values()) / max(len(last_sparsity), 1), 4),
        "clients_seen": len(last_sparsity),
        "failed_client_rounds": sum(c["status"] != "ok" for r in records for c in r["clients"]),
        "run_dir": str(run_dir.relative_to(ROOT)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 80-device fleet")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--target-accuracy", type=float, default=0.65)
    ap.add_argument("--target-sparsity", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--from-runs", metavar="STAMP",
                    help="only summarize runs/bench-fleet-<method>-STAMP (or METHOD=STAMP,... per method)")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "fleet_bandit.json")
    args = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    stamps = {m: stamp for m in args.methods.split(",")}
    if args.from_runs and "=" in args.from_runs:
        stamps = dict(part.split("=", 1) for part in args.from_runs.split(","))
    elif args.from_runs:
        stamps = {m: args.from_runs for m in stamps}
    results: dict = {}
    earlier = json.loads(args.out.read_text()).get("methods", {}) if args.from_runs and args.out.is_file() else {}
    for method in stamps:
        run_dir = ROOT / "runs" / f"bench-fleet-{method}-{stamps[method]}"
        t0 = time.time()
        if not args.from_runs:
            run_dir.mkdir(parents=True)
            cfg_path = run_dir.with_suffix(".toml")
            cfg_path.write_text(tomli_w.dumps(experiment(args, method)))
            proc = subprocess.run([sys.executable, "-m", "fedtune", "simulate", "--config", str(cfg_path), "--out",
                                   str(run_dir)], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        wall = earlier.get(method, {}).get("wall_s") if args.from_runs else round(time.time() - t0, 1)
        results[method] = {**summarize(run_dir, args.target_accuracy), "wall_s": wall}
        print(method, json.dumps(results[method]), flush=True)
        write(args, results, complete=False)  # partial results survive an interrupted run
    print(json.dumps(write(args, results, complete=True), indent=2))


def speedup(results: dict, target: str) -> tuple[float | None, float | None]:
    """(S-UCB's speedup over the fastest static baseline at ``target``, or a lower bound on it when no
    static baseline reached the target within its run: its whole simulated time / S-UCB's time)."""
    sucb = results.get("s-ucb", {}).get("time_to_targets_s", {}).get(target)
    statics = [m for m in results if m.startswith("static")]
    if not sucb or not statics:
        return None, None
    reached = [results[m]["time_to_targets_s"][target] for m in statics]
    reached = [t for t in reached if t is not None]
    if reached:
        return round(min(reached) / sucb, 3), None
    return None, round(min(results[m]["sim_time_s"] for m in statics) / sucb, 3)


def write(args: argparse.Namespace, results: dict, complete: bool) -> dict:
    value, bound = speedup(results, str(args.target_accuracy))
    sparsity = [r["mean_final_sparsity"] for r in results.values()]
    out = {
        "speedup_vs_best_static": value,
        "speedup_vs_best_static_lower_bound": bound,
        "speedup_by_target": {t: dict(zip(("value", "lower_bound"), speedup(results, t))) for t in map(str, TARGETS)},
        "sparsity_spread": round(max(sparsity) - min(sparsity), 4) if sparsity else None,
        "complete": complete,
        "target_accuracy": args.target_accuracy, "target_sparsity": args.target_sparsity,
        "fleet_size": sum(experiment(args, "s-ucb")["fleet"]["devices"].values()),
        "scale": args.scale, "rounds": args.rounds, "fraction": args.fraction, "local_steps": args.local_steps,
        "seed": args.seed, "methods": results,
        "command": "python simulations/bench/fleet_bandit.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
