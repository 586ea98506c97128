"""Reproduce FedSpine's comparison (arXiv 2501.02438): every setting in ``simulations/fedspine/``,
every method, every seed, then ``fedtune report`` over the runs.

A setting TOML names the base experiment (``[experiment]``), the common target sparsity, the
seeds, the target metric and the methods. The methods (all on the same simulated fleet, same
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
  ``ranks``; fixed ratio; FlexLoRA) runs with the first seed; the one that reaches the target
  soonest (then: best final metric) runs with every seed (its first-seed run is reused).

Runs go to ``<runs-dir>/<setting>/<method>/seed<k>/`` with an ``experiment.json`` the report
reads; a finished run (``summary.json``) is skipped and an interrupted one resumes from its
checkpoint, so the driver can be stopped and started again.

    .venv/bin/python simulations/reproduce.py                 # all settings, then the report
    .venv/bin/python simulations/reproduce.py --settings simulations/fedspine/minilm-s30.toml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fedspine", "hetlora", "flexlora", "fedit", "random", "best-static", "ucb1")
REQUIRED = ("setting", "sparsity", "seeds", "metric", "target", "ranks", "class_ranks", "methods", "experiment")


def load_setting(path: Path) -> dict[str, Any]:
    try:
        s = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"reproduce: cannot read setting {path}: {exc}") from None
    for key in REQUIRED:
        if key not in s:
            raise SystemExit(f"reproduce: {path}: missing key {key!r}")
    unknown = sorted(set(s["methods"]) - set(METHODS))
    if unknown:
        raise SystemExit(f"reproduce: {path}: methods: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    devices = s["experiment"].get("fleet", {}).get("devices", {})
    missing = sorted(set(devices) - set(s["class_ranks"]))
    if missing:
        raise SystemExit(f"reproduce: {path}: class_ranks: no rank for device class {missing[0]!r}")
    if not 0 < float(s["sparsity"]) < 1:
        raise SystemExit(f"reproduce: {path}: sparsity: must be in (0, 1), got {s['sparsity']}")
    if s["metric"] not in ("eval_accuracy", "eval_perplexity"):
        raise SystemExit(f"reproduce: {path}: metric: 'eval_accuracy' or 'eval_perplexity', got {s['metric']!r}")
    from fedtune.core.config import ConfigError, config_from_dict

    for m in s["methods"]:  # every run's config is checked now, not after hours of earlier runs
        for name in (list(grid(s)) if m == "best-static" else [m]):
            try:
                config_from_dict(method_config(s, name, s["seeds"][0], grid(s).get(name)))
            except ConfigError as exc:
                raise SystemExit(f"reproduce: {path}: [experiment] for method {name!r}: {exc}") from None
    return s


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def static_arms(s: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    sp = float(s["sparsity"])
    return {"name": "static", "ratio_mode": "target", "ratios": [sp], "ranks": sorted(set(ranks.values())),
            "target_sparsity": sp, "args": {"arms": {c: [sp, int(r)] for c, r in ranks.items()}}}


def grid(s: dict[str, Any]) -> dict[str, dict[str, int]]:
    """best-static candidates: one rank for every device class (the per-class ranks are ``flexlora``)."""
    classes = sorted(s["experiment"].get("fleet", {}).get("devices", s["class_ranks"]))
    return {f"static-r{r}": {c: int(r) for c in classes} for r in s["ranks"]}


def method_config(s: dict[str, Any], method: str, seed: int, static: dict[str, int] | None = None) -> dict[str, Any]:
    sp, ranks = float(s["sparsity"]), [int(r) for r in s["ranks"]]
    cfg = _merge(s["experiment"], {"name": f"{s['setting']}.{method}.seed{seed}", "seed": seed})
    bandit = {"ratios": [round(sp / 2, 4), sp], "ranks": ranks, "target_sparsity": sp, "ratio_mode": "step"}
    if method == "fedspine":
        extra = {"federation": {"strategy": "fedspine", "strategy_args": {"aggregation": "flexlora"}},
                 "policy": {"name": "s-ucb", **bandit}}
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
                 "policy": static_arms(s, static)}
    else:
        raise ValueError(method)
    return _merge(cfg, extra)


def run_one(s: dict[str, Any], method: str, seed: int, runs: Path, cfg: dict[str, Any], meta: dict[str, Any],
            log: Any) -> Path:
    run_dir = runs / s["setting"] / method / f"seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    reuse = meta.get("reuse")
    if reuse and (runs / s["setting"] / reuse / f"seed{seed}" / "summary.json").is_file():
        shutil.copytree(runs / s["setting"] / reuse / f"seed{seed}", run_dir, dirs_exist_ok=True)
        info = json.loads((run_dir / "experiment.json").read_text())
        info.update(method=method, grid_candidate=False, **meta)
        (run_dir / "experiment.json").write_text(json.dumps(info, indent=2) + "\n")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "experiment.toml"
    cfg_path.write_text(tomli_w.dumps(cfg))
    (run_dir / "experiment.json").write_text(json.dumps(
        {"setting": s["setting"], "title": s.get("title", s["setting"]), "method": method, "seed": seed,
         "sparsity": s["sparsity"], "metric": s["metric"], "target": s["target"], **meta}, indent=2) + "\n")
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--config", str(cfg_path), "--out", str(run_dir)]
    if (run_dir / "checkpoint" / "meta.json").is_file():
        cmd.append("--resume")
    t0 = time.time()
    with (run_dir / "log.txt").open("a") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
        raise SystemExit(f"reproduce: {s['setting']}/{method}/seed{seed} failed (exit {proc.returncode});"
                         f" log {run_dir / 'log.txt'}:\n" + "\n".join(tail))
    log.write(f"{s['setting']}/{method}/seed{seed}: {time.time() - t0:.0f}s")
    return run_dir


def best_static(s: dict[str, Any], runs: Path) -> str:
    """The grid candidate (run with the first seed) that reaches the target soonest, then best final metric."""
    from fedtune.reporting.comparison import run_stats

    lower = "perplexity" in s["metric"]
    scored = []
    for name in grid(s):
        st = run_stats(runs / s["setting"] / name / f"seed{s['seeds'][0]}", target=s["target"] or None)
        ttt = st["time_to_target_s"]
        final = st["final"] if st["final"] is not None else float("inf" if lower else "-inf")
        scored.append(((ttt is None, ttt or 0.0, final if lower else -final), name))
    return min(scored)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="*", type=Path,
                    default=sorted((ROOT / "simulations" / "fedspine").glob("*.toml")))
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "fedspine")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "fedspine")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    settings = [load_setting(p) for p in args.settings]
    jobs: list[tuple[dict[str, Any], str, int]] = []
    for s in settings:
        for m in s["methods"]:
            if m == "best-static":
                jobs += [(s, name, s["seeds"][0]) for name in grid(s)] + [(s, m, seed) for seed in s["seeds"]]
            else:
                jobs += [(s, m, seed) for seed in s["seeds"]]
    t0 = time.time()
    dirs: list[Path] = []
    chosen: dict[str, str] = {}  # setting -> its best-static grid candidate
    with tqdm(jobs, desc="fedspine", unit="run", file=sys.stdout, dynamic_ncols=True) as bar:
        for s, m, seed in bar:
            bar.set_postfix_str(f"{s['setting']}/{m}/seed{seed}")
            meta: dict[str, Any] = {}
            static = None
            if m.startswith("static-"):
                static, meta = grid(s)[m], {"grid_candidate": True}
            elif m == "best-static":
                if s["setting"] not in chosen:  # the grid ran with the first seed, before these jobs
                    chosen[s["setting"]] = best_static(s, args.runs_dir)
                choice = chosen[s["setting"]]
                static, meta = grid(s)[choice], {"chosen": choice}
                if seed == s["seeds"][0]:
                    meta["reuse"] = choice
            if m.startswith("static-") or m == "best-static":
                meta["static_ranks"] = static
            dirs.append(run_one(s, m, seed, args.runs_dir, method_config(s, m, seed, static), meta, bar))
    print(f"[reproduce] {len(dirs)} runs in {time.time() - t0:.0f}s under {args.runs_dir}", flush=True)
    if not args.no_report:
        from fedtune.reporting.comparison import report

        roots = [args.runs_dir / s["setting"] for s in settings]
        out = report(roots, args.out, command="python simulations/reproduce.py " + " ".join(sys.argv[1:]),
                     machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print(f"[reproduce] report: {out}", flush=True)


if __name__ == "__main__":
    main()
