"""Reproduce FedSpine's comparison (arXiv 2501.02438): every setting in ``simulations/fedspine/``,
every method, every seed, then ``fedtune report`` over the runs.

A setting TOML names the base experiment (``[experiment]``), the common target sparsity, the
target metric and the methods, and what the comparison is judged by, declared before any run
(see ``fedtune/reporting/settings.py``): the ``baseline`` method (required), the ``target``,
``sustain_k``, ``final_window``, the evaluation ``seeds``, the ``tuning_seeds`` (disjoint from them)
and optional ``margins``. The methods (all on the same simulated fleet, same
sampling and availability for a seed, all completed to the setting's sparsity before deployment,
see ``fedtune/deployed.py``):

- ``fedspine``: the S-UCB bandit picks each client's (pruning step, rank) every round from
  observed loss, pruning and completion time; steps ``sparsity/2`` or ``sparsity``, capped at the
  sparsity; ranks ``ranks``; heterogeneous ranks aggregated with FlexLoRA.
- ``hetlora``: static ranks by device class (``class_ranks``), HetLoRA aggregation, pruning to the
  sparsity at a fixed ratio (on a client's first round).
- ``flexlora``: the same static ranks and pruning, FlexLoRA aggregation.
- ``fedit``: homogeneous FedIT (plain averaging) at the smallest rank every device class is given
  (``min(class_ranks)``), pruning at the fixed ratio.
- ``random``: the bandit's arms drawn at random; ``ucb1``: UCB1 over the same arms, one learner
  per client (used by ``simulations/bench/fleet_bandit.py``).
- ``best-static``: a small grid of static configurations (one rank for every class, each of
  ``ranks``; fixed ratio; FlexLoRA) runs on the tuning seeds only; the one that reaches the
  sustained target on the most of them, then soonest (geometric mean; a run that never reaches it
  counted at its horizon), then with the better mean final metric, runs on every evaluation seed.

Runs go to ``<runs-dir>/<setting>/<method>/seed<k>/`` with an ``experiment.json`` the report
reads; a finished run (``summary.json``) is skipped and an interrupted one resumes from its
checkpoint, so the driver can be stopped and started again.

    .venv/bin/python simulations/reproduce.py                 # all settings, then the report
    .venv/bin/python simulations/reproduce.py --settings simulations/fedspine/minilm-hidden.toml --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tomli_w
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("cost-ucb", "fedspine", "hetlora", "flexlora", "fedit", "random", "best-static", "static-by-class", "ucb1")
SCHEDULES = ("at-once", "gradual")
REQUIRED = ("setting", "sparsity", "seeds", "metric", "target", "baseline", "ranks", "class_ranks", "methods",
            "experiment")


def load_setting(path: Path) -> dict[str, Any]:
    try:
        s = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"reproduce: cannot read setting {path}: {exc}") from None
    for key in REQUIRED:
        if key not in s:
            raise SystemExit(f"reproduce: {path}: missing key {key!r}")
    devices = s["experiment"].get("fleet", {}).get("devices", {})
    missing = sorted(set(devices) - set(s["class_ranks"]))
    if missing:
        raise SystemExit(f"reproduce: {path}: class_ranks: no rank for device class {missing[0]!r}")
    if not 0 < float(s["sparsity"]) < 1:
        raise SystemExit(f"reproduce: {path}: sparsity: must be in (0, 1), got {s['sparsity']}")
    if s["metric"] not in ("eval_accuracy", "eval_perplexity"):
        raise SystemExit(f"reproduce: {path}: metric: 'eval_accuracy' or 'eval_perplexity', got {s['metric']!r}")
    from fedtune.core.config import ConfigError, config_from_dict
    from fedtune.reporting.settings import comparison_settings

    try:
        s["comparison"] = comparison_settings(s, str(path))
    except ConfigError as exc:
        raise SystemExit(f"reproduce: {exc}") from None
    if not s["seeds"]:
        raise SystemExit(f"reproduce: {path}: seeds: need at least one evaluation seed")
    if s["baseline"] not in s["methods"]:
        raise SystemExit(f"reproduce: {path}: baseline: {s['baseline']!r} is not one of the methods"
                         f" ({', '.join(s['methods'])})")
    if "best-static" in s["methods"] and not s.get("tuning_seeds"):
        raise SystemExit(f"reproduce: {path}: tuning_seeds: best-static is tuned on them; need at least one")
    for m, n in s.get("method_seeds", {}).items():
        if m not in s["methods"]:
            raise SystemExit(f"reproduce: {path}: method_seeds: {m!r} is not one of the methods")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(s["seeds"]):
            raise SystemExit(f"reproduce: {path}: method_seeds.{m}: need an integer in [1, {len(s['seeds'])}], got {n!r}")
    bad = sorted(set(s.get("grid_schedules", ["at-once"])) - set(SCHEDULES))
    if bad:
        raise SystemExit(f"reproduce: {path}: grid_schedules: unknown schedule {bad[0]!r} (known: {', '.join(SCHEDULES)})")
    unknown = sorted(set(s["methods"]) - set(METHODS) - set(grid(s)))
    if unknown:  # a grid candidate (e.g. static-r4) may also run on the evaluation seeds, as a method of its own
        raise SystemExit(f"reproduce: {path}: methods: unknown method {unknown[0]!r}"
                         f" (known: {', '.join(METHODS)}, or one of best-static's grid: {', '.join(grid(s))})")

    if "static-by-class" in s["methods"]:
        s["datasheet_arms"] = datasheet_arms(s)
    for m in s["methods"]:  # every run's config is checked now, not after hours of earlier runs
        for name in (list(grid(s)) if m == "best-static" else [m]):
            try:
                config_from_dict(method_config(s, name, s["seeds"][0], static_of(s, name)))
            except ConfigError as exc:
                raise SystemExit(f"reproduce: {path}: [experiment] for method {name!r}: {exc}") from None
    return s


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def static_arms(s: dict[str, Any], ranks: dict[str, int], schedule: str = "at-once",
                steps: dict[str, float] | None = None) -> dict[str, Any]:
    """A static policy: per device class a rank, pruned to the sparsity at once (``ratio_mode`` target)
    or in steps (``gradual``: half the sparsity a round, or per class ``steps``, until it is reached)."""
    sp = float(s["sparsity"])
    if schedule == "at-once" and not steps:
        return {"name": "static", "ratio_mode": "target", "ratios": [sp], "ranks": sorted(set(ranks.values())),
                "target_sparsity": sp, "args": {"arms": {c: [sp, int(r)] for c, r in ranks.items()}}}
    steps = steps or {c: round(sp / 2, 4) for c in ranks}
    return {"name": "static", "ratio_mode": "step", "ratios": sorted({round(sp / 2, 4), sp, *steps.values()}),
            "ranks": sorted(set(ranks.values())), "target_sparsity": sp,
            "args": {"arms": {c: [steps[c], int(r)] for c, r in ranks.items()}}}


def grid(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """best-static candidates: one rank for every device class (``grid_ranks``, default ``ranks``) under each
    pruning schedule of ``grid_schedules`` (default at once; the per-class ranks are ``flexlora``)."""
    classes = sorted(s["experiment"].get("fleet", {}).get("devices", s["class_ranks"]))
    out = {}
    for schedule in s.get("grid_schedules", ["at-once"]):
        for r in s.get("grid_ranks", s["ranks"]):
            name = f"static-r{r}" + ("" if schedule == "at-once" else f"-{schedule}")
            out[name] = {"ranks": {c: int(r) for c in classes}, "schedule": schedule}
    return out


def datasheet_arms(s: dict[str, Any]) -> dict[str, list[float]]:
    """Static by device class from datasheets: per class the (pruning step, rank) of the fedspine method's
    arms that the cost model picks from the profiles' nominal speeds alone (no hidden part;
    ``fedtune.fleet.costsim.datasheet_arms``)."""
    from fedtune.core.config import config_from_dict
    from fedtune.fleet.costsim import CostSim, model_dims
    from fedtune.fleet.costsim import datasheet_arms as sheet

    cfg = config_from_dict(method_config(s, "fedspine", s["seeds"][0]))
    return {c: [a.ratio, a.rank] for c, a in sorted(sheet(CostSim(cfg, model_dims(cfg))).items())}


def static_of(s: dict[str, Any], method: str) -> dict[str, Any] | None:
    """A grid candidate's ranks and schedule, or static-by-class's arms; None for other methods."""
    if method == "static-by-class":
        return {"arms": s["datasheet_arms"]}
    return grid(s).get(method)


def seeds_of(s: dict[str, Any], method: str) -> list[int]:
    """The evaluation seeds ``method`` runs on: all, or the first ``method_seeds[method]``."""
    return list(s["seeds"])[: s.get("method_seeds", {}).get(method, len(s["seeds"]))]


def method_config(s: dict[str, Any], method: str, seed: int, static: dict[str, Any] | None = None) -> dict[str, Any]:
    sp, ranks = float(s["sparsity"]), [int(r) for r in s["ranks"]]
    cfg = _merge(s["experiment"], {"name": f"{s['setting']}.{method}.seed{seed}", "seed": seed})
    bandit = {"ratios": [round(sp / 2, 4), sp], "ranks": ranks, "target_sparsity": sp, "ratio_mode": "step"}
    if method in ("fedspine", "cost-ucb"):
        extra = {"federation": {"strategy": "fedspine", "strategy_args": {"aggregation": "flexlora"}},
                 "policy": {"name": "s-ucb" if method == "fedspine" else "cost-ucb", **bandit}}
    elif method == "static-by-class":
        if static is None:
            raise ValueError(f"{method}: needs the per-class arms")
        arms = static["arms"]
        extra = {"federation": {"strategy": "fedspine", "strategy_args": {"aggregation": "flexlora"}},
                 "policy": static_arms(s, {c: int(a[1]) for c, a in arms.items()}, "gradual",
                                       {c: float(a[0]) for c, a in arms.items()})}
    elif method in ("random", "ucb1"):
        extra = {"federation": {"strategy": "fedspine", "strategy_args": {"aggregation": "flexlora"}},
                 "policy": {"name": method, **bandit}}
    elif method in ("hetlora", "flexlora"):
        extra = {"federation": {"strategy": "fedspine", "strategy_args": {"aggregation": method}},
                 "policy": static_arms(s, s["class_ranks"])}
    elif method == "fedit":
        extra = {"federation": {"strategy": "fedit"}, "lora": {"ranks": [min(s["class_ranks"].values())]},
                 "prune": {"ratio": sp}}
    elif method.startswith("static") or method == "best-static":
        if static is None:
            raise ValueError(f"{method}: needs the static ranks")
        extra = {"federation": {"strategy": "fedspine", "strategy_args": {"aggregation": "flexlora"}},
                 "policy": static_arms(s, static["ranks"], static.get("schedule", "at-once"))}
    else:
        raise ValueError(method)
    return _merge(cfg, extra)


def run_one(s: dict[str, Any], method: str, seed: int, runs: Path, cfg: dict[str, Any], meta: dict[str, Any],
            log: Any, ray_address: str = "", ray_tmpdir: str = "") -> Path:
    """Run ``method`` with ``seed`` into ``<runs>/<setting>/<method>/seed<seed>/`` (a finished run is kept,
    an interrupted one resumes); its ``experiment.json`` carries the setting's comparison keys.
    ``ray_address`` attaches the run to that Ray cluster (``simulation.ray_address``); ``ray_tmpdir`` gives
    its own local Ray a folder of its own (runs side by side)."""
    from fedtune.core.config import config_from_dict
    from fedtune.reporting.settings import comparison_settings
    from fedtune.round.checkpoint import has_checkpoint

    run_dir = runs / s["setting"] / method / f"seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "experiment.toml"
    cfg_path.write_text(tomli_w.dumps(cfg))
    judged = (s.get("comparison") or comparison_settings(s, s["setting"])).to_json()
    (run_dir / "experiment.json").write_text(json.dumps(
        {"setting": s["setting"], "title": s.get("title", s["setting"]), "method": method, "seed": seed,
         "sparsity": s["sparsity"], "metric": s["metric"], **judged,
         "methods": list(s["methods"]), "eval_size": config_from_dict(cfg).data.eval_size, **meta}, indent=2) + "\n")
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--config", str(cfg_path), "--out", str(run_dir)]
    if ray_address:
        cmd += ["--set", f'simulation.ray_address="{ray_address}"']
    elif ray_tmpdir:
        cmd += ["--set", f'simulation.ray_tmpdir="{ray_tmpdir}"']
    # an interrupted run resumes from its committed checkpoint; otherwise the run starts afresh in the
    # folder that already holds its experiment files (and whatever an interrupted start left)
    cmd.append("--resume" if has_checkpoint(run_dir / "checkpoint") else "--force")
    t0 = time.time()
    with (run_dir / "log.txt").open("a") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
        raise SystemExit(f"reproduce: {s['setting']}/{method}/seed{seed} failed (exit {proc.returncode});"
                         f" log {run_dir / 'log.txt'}:\n" + "\n".join(tail))
    log.write(f"{s['setting']}/{method}/seed{seed}: {time.time() - t0:.0f}s", file=sys.stdout)
    return run_dir


def best_static(s: dict[str, Any], runs: Path) -> str:
    """The grid candidate (run on the tuning seeds) that reaches the sustained target on the most tuning
    seeds, then with the shortest geometric-mean time to it (a run that never reaches it counted at its
    horizon), then with the better mean final metric (the mean of each run's last ``final_window``
    evaluations). Without a declared target, or when no tuning run reached it: the better mean final
    metric alone."""
    import math

    from fedtune.reporting.comparison import run_stats
    from fedtune.reporting.settings import comparison_settings
    from fedtune.reporting.stats import geomean

    cs = s.get("comparison") or comparison_settings(s, s["setting"])
    lower = "perplexity" in s["metric"]
    scored = []
    for name in grid(s):
        stats = [run_stats(runs / s["setting"] / name / f"seed{seed}", target=cs.target,
                           sustain_k=cs.sustain_k, final_window=cs.final_window) for seed in cs.tuning_seeds]
        times = [st["sustained"].time_s for st in stats if st["sustained"] is not None]
        censored = sum(st["sustained"].censored for st in stats if st["sustained"] is not None)
        ttt = geomean(times) if times and min(times) > 0 and censored < len(times) else 0.0  # none reached: by final
        finals = [st["final_metric"] for st in stats if st["final_metric"] is not None]
        final = sum(finals) / len(finals) if finals else (math.inf if lower else -math.inf)
        scored.append(((censored, ttt, final if lower else -final), name))
    return min(scored)[1]


Job = tuple[dict[str, Any], str, int]  # (setting, method or grid candidate, seed)


def plan(settings: list[dict[str, Any]]) -> tuple[list[Job], list[Job]]:
    """Phase 1: best-static's grid on the tuning seeds. Phase 2: every method on its evaluation seeds, seed by
    seed (an interrupted reproduction has whole seeds to compare), the methods on every seed first, then those
    with fewer (``method_seeds``); best-static runs as the grid chose."""
    tuning = [(s, name, seed) for s in settings if "best-static" in s["methods"]
              for seed in s["tuning_seeds"] for name in grid(s)]
    evaluation = sorted(((s, m, seed) for s in settings for seed in s["seeds"] for m in s["methods"]
                         if seed in seeds_of(s, m)),
                        key=lambda j: (len(seeds_of(j[0], j[1])) < len(j[0]["seeds"]), j[0]["seeds"].index(j[2])))
    return tuning, evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="*", type=Path,
                    default=sorted((ROOT / "simulations" / "fedspine").glob("*.toml")))
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "fedspine")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "fedspine")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--tuning-only", action="store_true", help="run best-static's grid on the tuning seeds, name"
                    " the choice and stop (a setting may declare its target after these runs, before any on an"
                    " evaluation seed)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each a single-threaded simulation"
                    " with its own Ray; 2 on a 2-core machine)")
    ap.add_argument("--ray-address", default="", help="run every simulation on this Ray cluster"
                    " (host:port of `ray start --head`; simulation.ray_address) instead of a fresh local Ray each")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs: need at least 1")
    if args.jobs > 1 and args.ray_address:
        ap.error("--jobs: runs side by side each start their own Ray; leave out --ray-address")
    return args


def run_all(settings: list[dict[str, Any]], args: argparse.Namespace) -> list[Path] | None:
    """Runs the grid on the tuning seeds, names each setting's best static, then runs the evaluation
    seeds; returns the run folders, or None after ``--tuning-only``'s first phase."""
    tuning, evaluation = plan(settings)
    dirs: list[Path] = []
    chosen: dict[str, str] = {}  # setting -> its best-static grid candidate
    slots: queue.Queue[int] = queue.Queue()  # side-by-side runs each start Ray in a folder of their own
    for i in range(args.jobs):
        slots.put(i)

    def job(s: dict[str, Any], m: str, seed: int, bar: Any) -> Path:
        meta: dict[str, Any] = {}
        static = static_of(s, m)
        if m.startswith("static-r"):  # on a tuning seed a grid candidate; on an evaluation seed a method
            meta = {"grid_candidate": seed in s.get("tuning_seeds", []), "static": static}
        elif m == "best-static":
            static = grid(s)[chosen[s["setting"]]]
            meta = {"chosen": chosen[s["setting"]], "static": static}
        elif m == "static-by-class":
            meta = {"static": static}
        slot = slots.get()
        try:
            run = run_one(s, m, seed, args.runs_dir, method_config(s, m, seed, static), meta, bar, args.ray_address,
                          f"/tmp/fedtune-ray-{os.getpid()}-{slot}" if args.jobs > 1 else "")
        finally:
            slots.put(slot)
        bar.update(1)
        return run

    with tqdm(total=len(tuning) + len(evaluation), desc="fedspine", unit="run", file=sys.stdout,
              dynamic_ncols=True) as bar, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for phase in (tuning, evaluation):
            if phase is evaluation:
                for s in settings:
                    if "best-static" in s["methods"]:
                        chosen[s["setting"]] = best_static(s, args.runs_dir)
                        bar.write(f"[reproduce] {s['setting']}: best-static is {chosen[s['setting']]}"
                                  f" (on tuning seeds {', '.join(map(str, s['tuning_seeds']))})")
            futures = [pool.submit(job, s, m, seed, bar) for s, m, seed in phase]
            try:
                for f in futures:
                    dirs.append(f.result())
            except BaseException:  # a failed run stops the reproduction: runs not started are dropped,
                for f in futures:  # the ones running finish (and are kept for the next start)
                    f.cancel()
                raise
            if args.tuning_only:
                for s in settings:
                    if "best-static" in s["methods"]:
                        bar.write(f"[reproduce] {s['setting']}: best-static would be {best_static(s, args.runs_dir)}")
                return None
    return dirs


def main() -> None:
    args = parse_args()
    settings = [load_setting(p) for p in args.settings]
    t0 = time.time()
    dirs = run_all(settings, args)
    if dirs is None:
        print(f"[reproduce] {len(plan(settings)[0])} tuning runs in {time.time() - t0:.0f}s under {args.runs_dir}",
              flush=True)
        return
    print(f"[reproduce] {len(dirs)} runs in {time.time() - t0:.0f}s under {args.runs_dir}", flush=True)
    if not args.no_report:
        from fedtune.reporting.comparison import report

        roots = [args.runs_dir / s["setting"] for s in settings]
        out = report(roots, args.out, command="python simulations/reproduce.py " + " ".join(sys.argv[1:]),
                     machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                     settings={s["setting"]: s["comparison"] for s in settings})
        print(f"[reproduce] report: {out}", flush=True)


if __name__ == "__main__":
    main()
