"""``fedtune report RUN_DIR...``: compare runs side by side, with plots and a markdown table.

Runs are grouped by setting and method (from the ``experiment.json`` that
``simulations/reproduce.py`` writes next to each run; a plain ``fedtune simulate`` run is its
own method in a setting called ``runs``), seeds are aggregated (mean and standard deviation).
Written to the output directory:

- ``table.md``: per setting, per method: simulated time to the target metric, speed-up over the
  best other method, final metric of the global adapter, metric / CPU latency / size of the
  deployed pruned models, bytes sent, peak client memory, sparsity (trained -> deployed);
- ``summary.json``: the same numbers (``time_to_target_s``, ``final_accuracy``, ``final_masked_accuracy`` or
  ``final_perplexity``, ``speedup_vs_best_baseline``, ...), per seed as well;
- per setting: ``<setting>-accuracy.png`` (metric against simulated time), ``<setting>-arms.png``
  (rank and pruning step chosen per device class over rounds, FedSpine's first seed),
  ``<setting>-trajectories.png`` (sparsity and rank by round), ``<setting>-bytes.png``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fedtune.core.metric import masked, metric_named, metric_of_records, time_to_target
from fedtune.core.protocol import ClientKey as C
from fedtune.core.protocol import RoundKey as R
from fedtune.core.protocol import Status
from fedtune.round.outputs import read_metrics

__all__ = ["run_stats", "find_runs", "report"]


BASELINE_ORDER = ("fedspine", "hetlora", "flexlora", "fedit", "random", "best-static")


def find_runs(paths: list[Path], say: Any = print) -> list[Path]:
    """Finished runs (``metrics.jsonl`` and ``summary.json``) at or under ``paths``; unfinished ones are
    named and left out."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "metrics.jsonl").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(m.parent for m in p.rglob("metrics.jsonl"))
        else:
            raise FileNotFoundError(f"fedtune report: {p} is not a run directory (no metrics.jsonl) nor a folder of runs")
    unfinished = sorted(str(r) for r in set(out) if not (r / "summary.json").is_file())
    if unfinished:
        say(f"[fedtune] report: leaving out {len(unfinished)} unfinished run(s) (no summary.json): {', '.join(unfinished)}")
    return sorted(r for r in set(out) if (r / "summary.json").is_file())


def _metric(records: list[dict[str, Any]]) -> str:
    return metric_of_records(records).key


def run_stats(run_dir: Path, target: float | None = None, prefer_masked: bool = True) -> dict[str, Any]:
    """One run's figures; ``target`` overrides the one in its ``experiment.json``. Times to target,
    final and best values read the masked metric (the global adapter under devices' pruning masks)
    when the run recorded it and ``prefer_masked``, else the unmasked one."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    info = json.loads((run_dir / "experiment.json").read_text()) if (run_dir / "experiment.json").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    base_metric = info.get("metric") or _metric(records)
    shown = masked(metric_named(base_metric))
    metric = shown.key if prefer_masked and any(r.get(shown.key) is not None for r in records) else base_metric
    if target is None:
        target = info.get("target") or None
    evals = [r for r in records if r.get(metric) is not None]
    ok = [c for r in records for c in r.get(R.CLIENTS, []) if c.get(C.STATUS) == Status.OK]
    dep = summary.get("deployment", {})
    classes: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for r in records:
        for c in r.get(R.CLIENTS, []):
            if c.get(C.STATUS) == Status.OK and c.get(C.DEVICE):
                step = c.get(C.ARM, {}).get("ratio", c.get(C.PRUNE_RATIO, 0.0))
                classes.setdefault(c[C.DEVICE], {}).setdefault(r[R.ROUND], []).append((c.get(C.RANK, 0), step))
    cum, bytes_by_round = 0, []
    for r in records:
        cum += r.get(R.BYTES_UP, 0) + r.get(R.BYTES_DOWN, 0)
        bytes_by_round.append(cum)
    return {
        "run_dir": str(run_dir), "setting": info.get("setting", "runs"),
        "method": info.get("method", summary.get("name") or run_dir.name), "seed": info.get("seed", 0),
        "title": info.get("title", info.get("setting", "runs")), "grid_candidate": bool(info.get("grid_candidate")),
        "chosen": info.get("chosen"), "metric": metric, "target": target, "sparsity": info.get("sparsity"),
        "time_to_target_s": time_to_target(records, target, metric) if target else None,
        "final": evals[-1][metric] if evals else None,
        "best": metric_named(metric).best([r[metric] for r in evals]) if evals else None,
        "sim_time_s": records[-1].get(R.SIM_TIME_S), "rounds": records[-1][R.ROUND],
        "wall_time_s": records[-1].get(R.WALL_TIME_S),
        "bytes_sent": bytes_by_round[-1] if bytes_by_round else 0,
        "peak_mem_gb": max((c.get(C.PEAK_MEM_GB, 0.0) for c in ok), default=None),
        "mean_rank": statistics.fmean(c.get(C.RANK, 0) for c in ok) if ok else None,
        "failed_client_rounds": sum(c.get(C.STATUS) != Status.OK for r in records for c in r.get(R.CLIENTS, [])),
        "trained_sparsity": dep.get("trained_sparsity"), "deployed_sparsity": dep.get("deployed_sparsity"),
        "deployed_metric": dep.get(base_metric), "latency_ms": dep.get("latency_ms"),
        "dense_latency_ms": dep.get("dense_latency_ms"), "size_mb": dep.get("size_mb"),
        "records": records,  # every round's record, for times to other targets
        "curve": [(r.get(R.SIM_TIME_S, float(r[R.ROUND])), r[metric]) for r in evals],
        "rounds_trace": [{"round": r[R.ROUND],
                          "rank": _mean([c.get(C.RANK) for c in r.get(R.CLIENTS, []) if c.get(C.STATUS) == Status.OK]),
                          "sparsity": _mean([c.get(C.PRUNE_RATIO) for c in r.get(R.CLIENTS, [])
                                             if c.get(C.STATUS) == Status.OK])} for r in records if r[R.ROUND] > 0],
        "bytes_by_round": bytes_by_round,
        "arms_by_class": {k: {rnd: (_mean([a for a, _ in v]), _mean([b for _, b in v])) for rnd, v in sorted(d.items())}
                          for k, d in sorted(classes.items())},
    }


def _mean(vals: list[Any]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _agg(vals: list[Any]) -> dict[str, Any]:
    got = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    return {"mean": round(statistics.fmean(got), 4) if got else None,
            "std": round(statistics.stdev(got), 4) if len(got) > 1 else (0.0 if got else None),
            "n": len(got), "of": len(vals)}


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f} s"


def _auto_target(runs: list[dict[str, Any]], metric: str) -> float:
    """No target given: the least good of the methods' mean final values (every method's mean gets there)."""
    by: dict[str, list[float]] = {}
    for r in runs:
        if r["final"] is not None:
            by.setdefault(r["method"], []).append(r["final"])
    finals = [statistics.fmean(v) for v in by.values()]
    if not metric_named(metric).higher_is_better:  # rounded away from the value, so the least good method reaches it
        return math.ceil(max(finals) * 1e4) / 1e4
    return math.floor(min(finals) * 1e4) / 1e4


def _setting_table(setting: str, methods: dict[str, dict[str, Any]], metric: str, target: float) -> list[str]:
    m_ = metric_named(metric)
    short = m_.short
    fmt = (lambda v: f"{v:.4f}") if m_.higher_is_better else (lambda v: f"{v:.2f}")

    def cell(a: dict[str, Any], f: Any = lambda v: f"{v:.1f}", seeds: bool = False) -> str:
        if a["mean"] is None:
            return "never" if seeds else "n/a"
        s = f(a["mean"])
        if a["of"] > 1 and a["std"] is not None:
            s += f" ± {f(a['std'])}"
        if seeds and a["n"] < a["of"]:
            s += f" ({a['n']}/{a['of']} seeds)"
        return s

    lines = [f"Target: {short} {m_.comparator} {fmt(target)} on the server's held-out set"
             " (global adapter); mean ± std over seeds; a time to target is the mean over the seeds that reached"
             " it (how many, when not all); the speed-up compares those means with the fastest other method's.", "",
             f"| method | simulated s to target | speed-up vs best other | final {short} | deployed {short} |"
             " deployed latency ms (dense) | deployed size MB | bytes sent MB | peak client mem GB |"
             " sparsity trained → deployed | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        sp = m["speedup_vs_best_baseline"]
        spd = "n/a" if sp is None else (f"{sp:.2f}x" if not m.get("speedup_is_lower_bound") else f">= {sp:.2f}x")
        dense = m["dense_latency_ms"]["mean"]
        lat = cell(m["latency_ms"], lambda v: f"{v:.2f}") + (f" ({dense:.2f})" if dense else "")
        label = name + (f" ({m['chosen']})" if m.get("chosen") else "")
        lines.append(
            f"| {label} | {cell(m['time_to_target'], seeds=True)} | {spd} | {cell(m['final'], fmt)} |"
            f" {cell(m['deployed_metric'], fmt)} | {lat} | {cell(m['size_mb'], lambda v: f'{v:.1f}')} |"
            f" {cell(m['bytes_sent_mb'], lambda v: f'{v:.1f}')} | {cell(m['peak_mem_gb'], lambda v: f'{v:.3f}')} |"
            f" {cell(m['trained_sparsity'], lambda v: f'{v:.3f}')} → {cell(m['deployed_sparsity'], lambda v: f'{v:.3f}')}"
            f" | {m['seeds']} |")
    return lines


def _plots(setting: str, title: str, runs: list[dict[str, Any]], metric: str, target: float, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [m for m in BASELINE_ORDER if any(r["method"] == m for r in runs)]
    order += sorted({r["method"] for r in runs} - set(order))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(order)}
    written = []

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in order:  # the best-static grid's candidates stay out of this plot (the table lists them)
        for i, r in enumerate(x for x in runs if x["method"] == m and not x["grid_candidate"]):
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, color=colors[m], lw=2.2 if m == "fedspine" else 1.3, alpha=0.9 if i == 0 else 0.45,
                    label=m if i == 0 else None, marker="o", ms=2.5)
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax.set(xlabel="simulated time (s)", ylabel=metric.replace("eval_", "held-out "), title=f"{title}")
    if not metric_named(metric).higher_is_better:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{setting}-accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path.name)

    bandit = next((r for r in runs if r["method"] == "fedspine"), None)
    if bandit and bandit["arms_by_class"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for cls, by_round in bandit["arms_by_class"].items():
            rounds = sorted(by_round)
            axes[0].plot(rounds, [by_round[k][0] for k in rounds], marker="o", label=cls)
            axes[1].plot(rounds, [by_round[k][1] for k in rounds], marker="o", label=cls)
        axes[0].set(xlabel="round", ylabel="mean LoRA rank chosen", title="S-UCB: rank by device class")
        axes[1].set(xlabel="round", ylabel="mean pruning step chosen", title="S-UCB: pruning step by device class")
        for ax in axes:
            ax.legend(fontsize=8)
        written.append(_save(fig, axes, f"{title} (seed {bandit['seed']})", out / f"{setting}-arms.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for m in order:
        rs = [r for r in runs if r["method"] == m and not r["grid_candidate"]]
        if not rs:
            continue
        r = rs[0]
        rounds = [t["round"] for t in r["rounds_trace"]]
        axes[0].plot(rounds, [t["sparsity"] for t in r["rounds_trace"]], marker="o", color=colors[m], label=m)
        axes[1].plot(rounds, [t["rank"] for t in r["rounds_trace"]], marker="o", color=colors[m], label=m)
        axes[2].plot(range(len(r["bytes_by_round"])), [b / 2**20 for b in r["bytes_by_round"]], marker="o",
                     color=colors[m], label=m)
    axes[0].set(xlabel="round", ylabel="mean sparsity of the round's clients", title="sparsity")
    axes[1].set(xlabel="round", ylabel="mean LoRA rank of the round's clients", title="rank")
    axes[2].set(xlabel="round", ylabel="MB sent (up + down), cumulative", title="bytes sent")
    axes[0].legend(fontsize=8)
    written.append(_save(fig, axes, f"{title} (first seed of each method)", out / f"{setting}-trajectories.png"))
    return written


def _save(fig: Any, axes: Any, title: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _method_stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's runs (one per seed) aggregated: mean, std and count per figure, and per seed."""
    return {
        "seeds": len(rs), "chosen": rs[0]["chosen"],
        "time_to_target": _agg([r["time_to_target_s"] for r in rs]),
        "final": _agg([r["final"] for r in rs]), "best": _agg([r["best"] for r in rs]),
        "deployed_metric": _agg([r["deployed_metric"] for r in rs]),
        "latency_ms": _agg([r["latency_ms"] for r in rs]),
        "dense_latency_ms": _agg([r["dense_latency_ms"] for r in rs]),
        "size_mb": _agg([r["size_mb"] for r in rs]),
        "bytes_sent_mb": _agg([r["bytes_sent"] / 2**20 for r in rs]),
        "peak_mem_gb": _agg([r["peak_mem_gb"] for r in rs]),
        "trained_sparsity": _agg([r["trained_sparsity"] for r in rs]),
        "deployed_sparsity": _agg([r["deployed_sparsity"] for r in rs]),
        "sim_time_s": _agg([r["sim_time_s"] for r in rs]),
        "mean_rank": _agg([r["mean_rank"] for r in rs]),
        "per_seed": [{k: r[k] for k in ("seed", "time_to_target_s", "final", "best", "deployed_metric",
                                        "sim_time_s", "trained_sparsity", "deployed_sparsity", "run_dir")}
                     for r in rs],
    }


def _compare_methods(methods: dict[str, dict[str, Any]], metric: str) -> None:
    """Each method's speed-up to the target and final metric against the best other method (in place)."""
    for name, m in methods.items():
        mine = m["time_to_target"]["mean"]
        others = {k: o for k, o in methods.items() if k != name}
        reached = [o["time_to_target"]["mean"] for o in others.values() if o["time_to_target"]["mean"]]
        m["speedup_vs_best_baseline"], m["speedup_is_lower_bound"] = None, False
        if mine and reached:
            m["speedup_vs_best_baseline"] = round(min(reached) / mine, 3)
        elif mine and others:  # no other method reached the target: their whole run is a lower bound
            m["speedup_vs_best_baseline"] = round(min(o["sim_time_s"]["mean"] for o in others.values()) / mine, 3)
            m["speedup_is_lower_bound"] = True
        finals = [o["final"]["mean"] for o in others.values() if o["final"]["mean"] is not None]
        if finals and m["final"]["mean"] is not None:
            best = metric_named(metric).best(finals)
            m["final_vs_best_baseline"] = round(m["final"]["mean"] - best, 4)
    key = f"final_{metric_named(metric).slug}"
    for m in methods.values():
        m[key] = m["final"]["mean"]
        m["time_to_target_s"] = m["time_to_target"]["mean"]  # mean over the seeds that reached it


def _setting_markdown(setting: str, title: str, methods: dict[str, dict[str, Any]], grid: dict[str, Any],
                      metric: str, target: float, pngs: list[str]) -> list[str]:
    md = [f"## {title}", ""] + _setting_table(setting, methods, metric, target) + [""]
    if grid:
        md += ["Best-static grid (first seed), simulated s to target: " + ", ".join(
            f"{k} {_secs(v['time_to_target_s'])}" for k, v in sorted(grid.items())) + ".", ""]
    fs = methods.get("fedspine")
    if fs:
        sp, fv = fs["speedup_vs_best_baseline"], fs.get("final_vs_best_baseline")
        fast = bool(sp and sp >= 1.4 and not fs["speedup_is_lower_bound"])
        close = not metric_named(metric).higher_is_better or (fv is not None and fv >= -0.005)
        verdict = "FedSpine's goal (>= 1.4x, final accuracy within 0.5 points) is " + (
            "met." if fast and close else "NOT met.")
        md += [f"FedSpine: speed-up vs the best other method {'n/a' if sp is None else f'{sp:.2f}x'}"
               f"{' (lower bound)' if fs['speedup_is_lower_bound'] else ''}; final {metric} vs the best other"
               f" method {'n/a' if fv is None else f'{fv:+.4f}'}. {verdict}", ""]
    return md + [f"![{setting}]({png})" for png in pngs] + [""]


def _setting(setting: str, srs: list[dict[str, Any]], target: float | None, out_dir: Path) -> tuple[dict, list[str]]:
    """One setting's summary entry and markdown section (plots written to ``out_dir``)."""
    metric = srs[0]["metric"]
    tgt = target or srs[0]["target"] or _auto_target([r for r in srs if not r["grid_candidate"]], metric)
    for r in srs:
        r["target"] = tgt
        r["time_to_target_s"] = time_to_target(r["records"], tgt, metric)
    main = [r for r in srs if not r["grid_candidate"]]
    names = [m for m in BASELINE_ORDER if any(r["method"] == m for r in main)]
    names += sorted({r["method"] for r in main} - set(names))
    methods = {name: _method_stats(sorted((r for r in main if r["method"] == name), key=lambda r: r["seed"]))
               for name in names}
    _compare_methods(methods, metric)
    grid = {r["method"]: {"time_to_target_s": r["time_to_target_s"], "final": r["final"]}
            for r in srs if r["grid_candidate"]}
    title = srs[0]["title"]
    pngs = _plots(setting, title, srs, metric, tgt, out_dir)
    entry = {"title": title, "metric": metric, "target": tgt, "sparsity": srs[0]["sparsity"], "methods": methods,
             "grid": grid, "plots": pngs}
    return entry, _setting_markdown(setting, title, methods, grid, metric, tgt, pngs)


def report(paths: list[Path], out_dir: Path, *, target: float | None = None, command: str = "",
           machine: str = "", prefer_masked: bool = True) -> Path:
    """Write ``table.md``, ``summary.json`` and the PNGs for the runs under ``paths`` to ``out_dir``."""
    out_dir = Path(out_dir)
    runs = [run_stats(p, target, prefer_masked) for p in find_runs(paths)]
    if not runs:
        raise FileNotFoundError(f"fedtune report: no runs under {', '.join(map(str, paths))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        settings.setdefault(r["setting"], []).append(r)
    summary: dict[str, Any] = {"settings": {}, "command": command, "machine": machine,
                               "date": time.strftime("%Y-%m-%d")}
    md = ["# FedSpine comparison", ""]
    if command:
        md += [f"Made by `{command}` on {machine or 'this machine'}, {summary['date']}.", ""]
    for setting, srs in sorted(settings.items()):
        summary["settings"][setting], section = _setting(setting, srs, target, out_dir)
        md += section
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir
