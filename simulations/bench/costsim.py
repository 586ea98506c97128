"""Cost-only fleet simulation of a FedSpine setting: time to target per policy, without training.

Plays every policy against the setting's fleet and cost model (``fedtune/fleet/costsim.py``: the
round, the progress model and the oracle are documented there) over many paired seeds, on three
fleets: the setting's class-determined fleet (every device of a class alike, as in the profiles),
the same fleet with hidden per-device multipliers (compute x0.5 or x1, link log-uniform in
[1/4, 4]), and with a fifth of the devices also drifting every 10 rounds between normal,
background load (compute x0.5) and a congested link (link x0.25). The arms are the setting's
``fedspine`` method's (pruning steps of half and all of the target sparsity, step mode, the
setting's ranks; as in ``simulations/reproduce.py``). The best uniform static (one arm for every
device) is chosen on tuning seeds, disjoint from the evaluation seeds; every speed-up is against
it, per seed, with a bootstrap 95% CI of the geometric mean. The oracle's speed-up bounds what
any policy could reach on that fleet under the progress model.

    .venv/bin/python simulations/bench/costsim.py      # writes simulations/results/costsim.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HIDDEN = ["fleet.hidden_compute=[0.5, 1.0]", 'fleet.hidden_compute_draw="choice"', "fleet.hidden_link=[0.25, 4.0]",
          'fleet.hidden_link_draw="log-uniform"']
DRIFT = ["fleet.drift_fraction=0.2", "fleet.drift_every=10", "fleet.drift_stay=0.5"]
OFF = ["fleet.hidden_compute=[]", "fleet.hidden_link=[]", "fleet.drift_fraction=0.0"]  # whatever the setting says
FLEETS = {"class-determined": OFF, "hidden": HIDDEN + ["fleet.drift_fraction=0.0"], "hidden+drift": HIDDEN + DRIFT}


def setting_config(path: Path, overrides: list[str]) -> tuple[dict, object]:
    """The setting's experiment with its fedspine method's policy (S-UCB's arms), plus ``overrides``."""
    from fedtune.core.config import config_from_dict

    s = tomllib.loads(path.read_text())
    sp, ranks = float(s["sparsity"]), [int(r) for r in s["ranks"]]
    table = dict(s["experiment"])
    table["policy"] = {"name": "s-ucb", "ratios": [round(sp / 2, 4), sp], "ranks": ranks, "target_sparsity": sp,
                       "ratio_mode": "step"}
    return s, config_from_dict(table, overrides)


def main() -> None:
    from fedtune.fleet.costsim import (
        ORACLE,
        CostSim,
        ProgressModel,
        class_static,
        compare,
        datasheet_arms,
        model_dims,
        registered,
    )
    from fedtune.fleet.policies import Arm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", type=Path, default=ROOT / "simulations" / "fedspine" / "previous" / "minilm-s30.toml")
    ap.add_argument("--eval-seeds", type=int, default=200, help="evaluation seeds 0..N-1")
    ap.add_argument("--tune-seeds", type=int, default=50, help="tuning seeds 10000..10000+N-1")
    ap.add_argument("--fleets", nargs="+", default=list(FLEETS), choices=list(FLEETS))
    ap.add_argument("--rank-exponent", type=float, default=ProgressModel.rank_exponent)
    ap.add_argument("--prune-penalty", type=float, default=ProgressModel.prune_penalty)
    ap.add_argument("--rounds-to-target", type=float, default=ProgressModel.rounds_to_target)
    ap.add_argument("--loss-gain", type=float, default=ProgressModel.loss_gain)
    ap.add_argument("--loss-noise", type=float, default=ProgressModel.loss_noise)
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "costsim.json")
    args = ap.parse_args()
    progress = ProgressModel(rank_exponent=args.rank_exponent, prune_penalty=args.prune_penalty,
                             rounds_to_target=args.rounds_to_target, loss_gain=args.loss_gain,
                             loss_noise=args.loss_noise)
    eval_seeds = list(range(args.eval_seeds))
    tune_seeds = list(range(10_000, 10_000 + args.tune_seeds))
    t0, c0 = time.time(), time.process_time()
    fleets = {}
    for fleet, overrides in ((f, FLEETS[f]) for f in args.fleets):
        s, cfg = setting_config(args.setting, overrides)
        sim = CostSim(cfg, model_dims(cfg), progress)
        sheet = datasheet_arms(sim)
        sp = float(s["sparsity"])
        setting_ranks = {c: Arm(sp, int(r)) for c, r in s["class_ranks"].items()}
        policies = {
            "cost-ucb": registered(sim, "cost-ucb"),
            "s-ucb": registered(sim, "s-ucb"),
            "ucb1": registered(sim, "ucb1"),
            "random": registered(sim, "random"),
            "static-by-class (datasheet)": class_static(sim, sheet),
            "static-by-class (setting's ranks)": class_static(sim, setting_ranks),
            "oracle": ORACLE,
        }
        print(f"[costsim] {fleet}: {len(eval_seeds)} evaluation seeds, {len(tune_seeds)} tuning seeds", flush=True)
        result = compare(sim, policies, eval_seeds=eval_seeds, tune_seeds=tune_seeds)
        result["overrides"] = overrides
        result["static_by_class_arms"] = {
            "datasheet": {c: [a.ratio, a.rank] for c, a in sorted(sheet.items())},
            "setting's ranks": {c: [a.ratio, a.rank] for c, a in sorted(setting_ranks.items())}}
        fleets[fleet] = result
        for name, r in result["policies"].items():
            print(f"  {name:40s} {r['time_to_target_mean_s']:8.1f} s  speed-up {r['speedup_geomean']:.3f}"
                  f" {r['speedup_ci95']}  censored {r['censored']}", flush=True)
    s, cfg = setting_config(args.setting, [])
    out = {
        "setting": str(args.setting.relative_to(ROOT)) if args.setting.is_relative_to(ROOT) else str(args.setting),
        "fleet": cfg.fleet.devices, "clients_per_round": cfg.federation.sample_size(cfg.federation.num_clients),
        "arms": {"ratios": cfg.policy.ratios, "ranks": cfg.policy.ranks, "ratio_mode": cfg.policy.ratio_mode,
                 "target_sparsity": cfg.policy.target_sparsity},
        "cost_ucb": {"round_time_bound": cfg.policy.round_time_bound,
                     "round_time_bound_s": cfg.policy.round_time_bound_s},
        "progress_model": {"rank_exponent": progress.rank_exponent, "prune_penalty": progress.prune_penalty,
                           "rounds_to_target": progress.rounds_to_target, "loss_gain": progress.loss_gain,
                           "loss_noise": progress.loss_noise, "horizon_rounds": progress.horizon *
                           progress.rounds_to_target},
        "definitions": {
            "time_to_target_s": "simulated seconds until the accepted client-rounds' utilities reach "
                                "rounds_to_target x clients_per_round (fedtune/fleet/costsim.py)",
            "speedup": "per evaluation seed, the best uniform static's time over the policy's; geometric mean "
                       "over seeds, percentile bootstrap 95% CI (2,000 resamples); a censored run counts at "
                       "the horizon",
            "best_uniform_static": "the uniform arm with the smallest geometric-mean time on the tuning seeds",
        },
        "fleets": fleets,
        "command": " ".join(["python simulations/bench/costsim.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "wall_s": round(time.time() - t0, 1),  # on a shared machine; cpu_s is this process's own time
        "cpu_s": round(time.process_time() - c0, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[costsim] wrote {args.out} in {out['wall_s']} s")


if __name__ == "__main__":
    main()
