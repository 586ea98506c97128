"""FedSpine's bandit on the 80-device fleet: simulated time to a target accuracy for S-UCB against
static-by-class, random and UCB1, over several seeds, every method at the same deployed sparsity.

The runs are those of the reproduction's ``minilm-s30`` setting (``simulations/fedspine/previous/minilm-s30.toml``:
MiniLM on Rotten Tomatoes, 30 Jetson TX2 + 40 Xavier NX + 10 AGX Xavier, a tenth of the fleet
sampled per round, clients really pruning; see ``simulations/reproduce.py`` for the methods):
S-UCB is ``fedspine`` (pruning steps of half or all of the target sparsity, ranks 4/8/16, pooled by
observed speed), static-by-class is ``flexlora`` (rank 4/8/16 for TX2/NX/AGX, pruning to the target
on a client's first round), random and UCB1 draw from S-UCB's arms. Finished runs under
``--runs-dir`` (shared with the reproduction driver) are reused, missing ones are run.

Every device that took part is completed to the target sparsity before deployment
(``fedtune/deployed.py``), so the deployed sparsity is the same for every method; the sparsity each
method reached in training is reported beside it.

    .venv/bin/python simulations/bench/fleet_bandit.py            # 3 seeds, writes simulations/results/fleet_bandit.json
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
sys.path.insert(0, str(ROOT / "simulations"))

METHODS = {"s-ucb": "fedspine", "static-by-class": "flexlora", "random": "random", "ucb1": "ucb1"}
STATICS = ("static-by-class", "best-static")
TARGETS = (0.6, 0.65, 0.7, 0.75)


def _mean(vals: list[float | None]) -> float | None:
    got = [v for v in vals if v is not None]
    return round(statistics.fmean(got), 4) if got else None


def speedup(results: dict, target: str) -> dict:
    """S-UCB's speed-up over the fastest static baseline at ``target``: the static's mean simulated time
    to the target over the S-UCB's (seeds where a method never reached it are left out of its mean;
    when no static run reached it, its whole simulated time gives a lower bound)."""
    sucb = results.get("s-ucb", {}).get("time_to_target_mean_s", {}).get(target)
    statics = [m for m in STATICS if m in results]
    if not sucb or not statics:
        return {"value": None, "lower_bound": None}
    reached = [results[m]["time_to_target_mean_s"][target] for m in statics]
    reached = [t for t in reached if t]
    if reached:
        return {"value": round(min(reached) / sucb, 3), "lower_bound": None}
    return {"value": None, "lower_bound": round(min(results[m]["sim_time_mean_s"] for m in statics) / sucb, 3)}


def main() -> None:
    import reproduce

    from fedtune.core.metric import time_to_target
    from fedtune.reporting.comparison import run_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", type=Path, default=ROOT / "simulations" / "fedspine" / "previous" / "minilm-s30.toml")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "fedspine")
    ap.add_argument("--target-accuracy", type=float, help="default: the setting's target")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "fleet_bandit.json")
    args = ap.parse_args()
    s = reproduce.load_setting(args.setting)
    if args.target_accuracy is None:
        args.target_accuracy = float(s["target"])

    class Log:
        def write(self, line: str) -> None:
            print(line, flush=True)

    t0 = time.time()
    results: dict = {}
    names = dict(METHODS)
    if (args.runs_dir / s["setting"] / "best-static").is_dir():  # the reproduction's grid winner, when it ran
        names["best-static"] = "best-static"
    for label, method in names.items():
        stats = []
        for seed in s["seeds"]:
            run_dir = args.runs_dir / s["setting"] / method / f"seed{seed}"
            if method != "best-static":
                print(f"[fleet_bandit] {label}: seed {seed}", flush=True)
                reproduce.run_one(s, method, seed, args.runs_dir, reproduce.method_config(s, method, seed), {}, Log())
            if (run_dir / "summary.json").is_file():
                stats.append(run_stats(run_dir, target=args.target_accuracy))
        if not stats:
            continue
        records = [st["records"] for st in stats]
        ttt = {str(a): [time_to_target(r, a) for r in records] for a in TARGETS}
        results[label] = {
            "method": method, "seeds": [st["seed"] for st in stats],
            "time_to_target_s": ttt, "time_to_target_mean_s": {a: _mean(v) for a, v in ttt.items()},
            "reached": {a: sum(v is not None for v in vals) for a, vals in ttt.items()},
            "final_accuracy": [st["final"] for st in stats], "final_accuracy_mean": _mean([st["final"] for st in stats]),
            "best_accuracy_mean": _mean([st["best"] for st in stats]),
            "deployed_accuracy_mean": _mean([st["deployed_metric"] for st in stats]),
            "accuracy_by_round": [[x.get("eval_accuracy") for x in r] for r in records],
            "sim_time_mean_s": _mean([st["sim_time_s"] for st in stats]),
            "run_wall_time_mean_s": _mean([st["wall_time_s"] for st in stats]),  # one run, on this machine
            "trained_sparsity_mean": _mean([st["trained_sparsity"] for st in stats]),
            "deployed_sparsity_mean": _mean([st["deployed_sparsity"] for st in stats]),
            "mean_rank": _mean([st["mean_rank"] for st in stats]),
            "failed_client_rounds": sum(st["failed_client_rounds"] for st in stats),
            "run_dirs": [str(Path(st["run_dir"]).relative_to(ROOT)) if Path(st["run_dir"]).is_relative_to(ROOT)
                         else st["run_dir"] for st in stats],
        }
    target = str(args.target_accuracy)
    deployed = [r["deployed_sparsity_mean"] for r in results.values() if r["deployed_sparsity_mean"] is not None]
    trained = [r["trained_sparsity_mean"] for r in results.values() if r["trained_sparsity_mean"] is not None]
    main_speedup = speedup(results, target)
    out = {
        "speedup_vs_best_static": main_speedup["value"],
        "speedup_vs_best_static_lower_bound": main_speedup["lower_bound"],
        "speedup_by_target": {str(a): speedup(results, str(a)) for a in TARGETS},
        "target_accuracy": args.target_accuracy, "target_sparsity": s["sparsity"],
        "sparsity_spread": round(max(deployed) - min(deployed), 4) if deployed else None,
        "trained_sparsity_spread": round(max(trained) - min(trained), 4) if trained else None,
        "fleet": s["experiment"]["fleet"]["devices"], "experiment": s["experiment"], "seeds": s["seeds"],
        "methods": results,
        # this script's wall time; finished runs are reused, so it says nothing about how long they took
        "script_wall_s": round(time.time() - t0, 1),
        "command": "python simulations/bench/fleet_bandit.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("speedup_vs_best_static", "speedup_vs_best_static_lower_bound",
                                          "speedup_by_target", "sparsity_spread", "trained_sparsity_spread")},
                     indent=2))
    for label, r in results.items():
        print(f"{label:16s} time to {target}: {r['time_to_target_s'][target]} final {r['final_accuracy']}"
              f" sparsity trained {r['trained_sparsity_mean']} deployed {r['deployed_sparsity_mean']}")


if __name__ == "__main__":
    main()
