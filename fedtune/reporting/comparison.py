"""``fedtune report RUN_DIR...``: compare runs with paired seeds, confidence intervals and plots.

Runs are grouped by setting and method (from the ``experiment.json`` that
``simulations/reproduce.py`` writes next to each run; a plain ``fedtune simulate`` run is its
own method in a setting called ``runs``). What a setting is judged by (baseline, target,
``sustain_k``, ``final_window``, seeds, margins) comes from its setting file
(:mod:`fedtune.reporting.settings`), copied into each run's ``experiment.json``. The statistics
(:mod:`fedtune.reporting.stats`):

- time to target is *sustained*: the first evaluation where the running mean of the last
  ``sustain_k`` evaluations reaches the target, in simulated seconds; a run that never gets there
  counts at its horizon (its last simulated time) as a censored lower bound, never dropped, and the
  table says how many were;
- seeds are paired across methods (a seed fixes client sampling, data split and device draws):
  per seed, speed-up = baseline time / method time; reported as the geometric mean over the seeds
  both ran, with a percentile bootstrap 95% CI (seeds resampled, fixed RNG seed) and which way
  censoring biases it; a seed only one of the two ran is left out of the pair and named;
- final metric = the mean of the last ``final_window`` evaluations of a run; against the baseline
  the paired difference (method - baseline) with its bootstrap 95% CI; for accuracy the held-out
  set's standard error sqrt(p (1 - p) / n) is printed beside it.

Time to target, final and curves read the masked metric (the global adapter under devices'
pruning masks) when a run recorded it, else the unmasked one. Written to the output directory:

- ``table.md``: per setting, the comparison table, a deployment table and the tuning grid; for runs
  with a federated evaluate phase, a table (also printed) of the clients' own held-out evaluation
  per run and device class (:func:`client_eval_table`);
- ``summary.json``: per setting and method the same figures (``speedup_geomean``,
  ``speedup_ci95``, ``seeds``, ``censored``, ``final_metric``, ``final_metric_diff_ci95``,
  ``baseline``, ...), per seed as well;
- per setting: ``<setting>-curves.png`` (mean metric with a 95% CI band across seeds against
  simulated time), ``<setting>-time-to-target.png`` (one dot per seed and method, censored seeds
  hollow at their horizon), ``<setting>-arms.png`` (ranks and pruning ratios an adaptive policy
  chose, per device class, when a method's arms vary), ``<setting>-trajectories.png`` (sparsity,
  rank and bytes by round).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.core.metric import masked, metric_named, metric_of_records, time_to_target
from fedtune.core.protocol import ClientKey as C
from fedtune.core.protocol import RoundKey as R
from fedtune.core.protocol import Status
from fedtune.reporting.settings import ComparisonSettings, comparison_settings
from fedtune.reporting.stats import (
    N_RESAMPLES,
    RNG_SEED,
    binomial_se,
    final_value,
    geomean,
    mean_band,
    paired_difference,
    paired_speedups,
    sustained_time,
)
from fedtune.round.outputs import read_metrics

__all__ = ["client_eval_table", "find_runs", "report", "run_stats"]


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


def _eval_size(info: dict[str, Any], run_dir: Path) -> int | None:
    """The held-out set's size: ``experiment.json`` (``eval_size`` or ``data.eval_size``), else the
    run's resolved ``config.toml``."""
    size = info.get("eval_size") or info.get("data", {}).get("eval_size")
    if size is None and (run_dir / "config.toml").is_file():
        try:
            size = tomllib.loads((run_dir / "config.toml").read_text()).get("data", {}).get("eval_size")
        except tomllib.TOMLDecodeError:
            size = None
    return int(size) if size else None


def run_stats(run_dir: Path, target: float | None = None, prefer_masked: bool = True, *,
              sustain_k: int | None = None, final_window: int | None = None) -> dict[str, Any]:
    """One run's figures; ``target``, ``sustain_k`` and ``final_window`` override the ones in its
    ``experiment.json``. ``time_to_target_s`` is the first evaluation that reaches the target;
    ``sustained`` the first where the running mean of the last ``sustain_k`` evaluations does
    (censored at the horizon when none does). Figures read the masked metric (the global adapter
    under devices' pruning masks) when the run recorded it and ``prefer_masked``, else the unmasked one."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    info = json.loads((run_dir / "experiment.json").read_text()) if (run_dir / "experiment.json").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    base_metric = info.get("metric") or _metric(records)
    shown = masked(metric_named(base_metric))
    metric = shown.key if prefer_masked and any(r.get(shown.key) is not None for r in records) else base_metric
    if target is None:
        target = info.get("target") or None
    k = sustain_k or int(info.get("sustain_k", 3))
    window = final_window or int(info.get("final_window", 5))
    evals = [r for r in records if r.get(metric) is not None]
    ok = [c for r in records for c in r.get(R.CLIENTS, []) if c.get(C.STATUS) == Status.OK]
    dep = summary.get("deployment", {})
    simulated = all(r.get(R.SIM_TIME_S) is not None for r in records)
    x = (lambda r: float(r[R.SIM_TIME_S])) if simulated else (lambda r: float(r[R.ROUND]))
    horizon = x(records[-1]) if records else 0.0
    higher = metric_named(metric).higher_is_better
    classes, arms = _played(records)
    bytes_by_round = list(itertools.accumulate(r.get(R.BYTES_UP, 0) + r.get(R.BYTES_DOWN, 0) for r in records))
    curve = [(x(r), float(r[metric])) for r in evals]
    return {
        "run_dir": str(run_dir), "setting": info.get("setting", "runs"),
        "method": info.get("method", summary.get("name") or run_dir.name), "seed": info.get("seed", 0),
        "title": info.get("title", info.get("setting", "runs")), "grid_candidate": bool(info.get("grid_candidate")),
        "chosen": info.get("chosen"), "metric": metric, "target": target, "sparsity": info.get("sparsity"),
        "info": info, "eval_size": _eval_size(info, run_dir), "time_axis": "sim_time_s" if simulated else "round",
        "sustain_k": k, "final_window": window, "horizon": horizon,
        "time_to_target_s": time_to_target(records, target, metric) if target else None,
        "sustained": sustained_time([t for t, _ in curve], [v for _, v in curve], target, k, higher, horizon)
        if target else None,
        "final": evals[-1][metric] if evals else None,
        "final_metric": final_value([v for _, v in curve], window),
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
        "client_eval": summary.get("client_eval"),  # the federated evaluate phase's last round, per device class
        "records": records,  # every round's record, for times to other targets
        "curve": curve,
        "rounds_trace": _rounds_trace(records),
        "bytes_by_round": bytes_by_round,
        "arms": arms,
        "arms_by_class": {k: {rnd: (_mean([a for a, _ in v]), _mean([b for _, b in v])) for rnd, v in sorted(d.items())}
                          for k, d in sorted(classes.items())},
    }


def _played(records: list[dict[str, Any]]) -> tuple[dict[str, dict[int, list[tuple[int, float]]]],
                                                     list[tuple[int, str, int, float]]]:
    """Per device class and round the (rank, ratio) its clients trained with, and every arm a policy
    played as (round, device class, rank, ratio)."""
    classes: dict[str, dict[int, list[tuple[int, float]]]] = {}
    arms: list[tuple[int, str, int, float]] = []
    for r in records:
        for c in r.get(R.CLIENTS, []):
            if c.get(C.STATUS) == Status.OK and c.get(C.DEVICE):
                step = c.get(C.ARM, {}).get("ratio", c.get(C.PRUNE_RATIO, 0.0))
                classes.setdefault(c[C.DEVICE], {}).setdefault(r[R.ROUND], []).append((c.get(C.RANK, 0), step))
                if c.get(C.ARM):
                    arm = c[C.ARM]
                    arms.append((r[R.ROUND], c[C.DEVICE], int(arm.get("rank", c.get(C.RANK, 0))),
                                 float(arm.get("ratio", 0.0))))
    return classes, arms


def _rounds_trace(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per training round the mean rank and pruning ratio of the clients that replied."""
    trace = []
    for r in records:
        if r[R.ROUND] > 0:
            ok = [c for c in r.get(R.CLIENTS, []) if c.get(C.STATUS) == Status.OK]
            trace.append({"round": r[R.ROUND], "rank": _mean([c.get(C.RANK) for c in ok]),
                          "sparsity": _mean([c.get(C.PRUNE_RATIO) for c in ok])})
    return trace


def _mean(vals: list[Any]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _agg(vals: list[Any]) -> dict[str, Any]:
    got = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    return {"mean": round(statistics.fmean(got), 4) if got else None,
            "std": round(statistics.stdev(got), 4) if len(got) > 1 else None,
            "n": len(got), "of": len(vals)}


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def _auto_target(runs: list[dict[str, Any]], metric: str) -> float:
    """No target declared: the least good of the methods' mean final values (every method's mean gets there)."""
    by: dict[str, list[float]] = {}
    for r in runs:
        if r["final_metric"] is not None:
            by.setdefault(r["method"], []).append(r["final_metric"])
    finals = [statistics.fmean(v) for v in by.values()]
    if not finals:
        raise ValueError("no evaluations to set a target from")
    if not metric_named(metric).higher_is_better:  # rounded away from the value, so the least good method reaches it
        return math.ceil(max(finals) * 1e4) / 1e4
    return math.floor(min(finals) * 1e4) / 1e4


def _resolve_settings(setting: str, srs: list[dict[str, Any]], given: ComparisonSettings | None) -> ComparisonSettings:
    """The setting's comparison keys: the ones given to the report, else the runs' ``experiment.json``
    (runs without them: no baseline, defaults)."""
    if given is not None:
        return given
    info = next((r["info"] for r in srs if not r["grid_candidate"]), srs[0]["info"])
    return comparison_settings(info, f"{setting} (experiment.json)", require_baseline=False)


def _order(names: set[str], srs: list[dict[str, Any]], baseline: str | None) -> list[str]:
    """The baseline first, then the setting's own order of methods (``experiment.json``), then the rest."""
    listed = next((r["info"].get("methods") for r in srs if r["info"].get("methods")), []) or []
    out = [baseline] if baseline in names else []
    out += [m for m in listed if m in names and m not in out]
    return out + sorted(names - set(out))


def _margins(m: dict[str, Any], margins: Mapping[str, float], higher: bool) -> dict[str, bool | None]:
    """Each declared margin: met (True), not met (False), or not resolvable (None: no speed-up, or one seed)."""
    out: dict[str, bool | None] = {}
    bias_ok = m["speedup_bias"] in ("none", "lower_bound")  # an upper bound or a mixed one proves no speed-up
    gm, ci, dci = m["speedup_geomean"], m["speedup_ci95"], m["final_metric_diff_ci95"]
    for key, v in margins.items():
        if key == "speedup_geomean":
            out[key] = None if gm is None else bool(gm >= v and bias_ok)
        elif key == "speedup_ci_low":
            out[key] = None if ci is None else bool(ci[0] > v and bias_ok)
        elif key == "final_metric_loss":
            out[key] = None if dci is None else bool(dci[0] >= -v if higher else dci[1] <= v)
    return out


def _method_stats(rs: list[dict[str, Any]], base: list[dict[str, Any]] | None, baseline: str | None,
                  cs: ComparisonSettings, higher: bool, eval_size: int | None, accuracy: bool) -> dict[str, Any]:
    """One method's runs (one per seed) against the baseline's, paired by seed."""
    ttt = {r["seed"]: r["sustained"] for r in rs}
    finals = {r["seed"]: r["final_metric"] for r in rs}
    times = [t.time_s for t in ttt.values()]
    fin = [v for v in finals.values() if v is not None]
    out: dict[str, Any] = {
        "seeds": sorted(ttt), "n_seeds": len(rs), "chosen": rs[0]["chosen"], "baseline": baseline,
        "is_baseline": rs[0]["method"] == baseline,
        "censored": sum(t.censored for t in ttt.values()),
        "censored_seeds": sorted(s for s, t in ttt.items() if t.censored),
        "time_to_target_geomean_s": _r(geomean(times), 3) if times and min(times) > 0 else None,
        "final_metric": _r(statistics.fmean(fin)) if fin else None,
        "final_metric_sd": _r(statistics.stdev(fin)) if len(fin) > 1 else None,
        "final_metric_se": _r(binomial_se(statistics.fmean(fin), eval_size)) if fin and eval_size and accuracy else None,
        "speedup_geomean": None, "speedup_ci95": None, "speedup_bias": None, "speedup_seeds": [],
        "unpaired_seeds": [], "final_metric_diff": None, "final_metric_diff_ci95": None,
    }
    sp: dict[str, Any] = {"per_seed": {}}
    diff: dict[str, Any] = {"per_seed": {}}
    if base is not None and not out["is_baseline"]:
        sp = paired_speedups(ttt, {r["seed"]: r["sustained"] for r in base})
        diff = paired_difference(finals, {r["seed"]: r["final_metric"] for r in base})
        out.update(speedup_geomean=_r(sp["geomean"], 3), speedup_ci95=[_r(v, 3) for v in sp["ci95"]] if sp["ci95"] else None,
                   speedup_bias=sp["bias"], speedup_seeds=sp["seeds"], unpaired_seeds=sp["unpaired_seeds"],
                   final_metric_diff=_r(diff["mean"]),
                   final_metric_diff_ci95=[_r(v) for v in diff["ci95"]] if diff["ci95"] else None)
        if cs.margins:
            out["margins"] = _margins(out, cs.margins, higher)
            vals = list(out["margins"].values())
            out["meets_margins"] = False if False in vals else (None if None in vals else True)
    out.update({
        "best": _agg([r["best"] for r in rs]),
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
        "per_seed": [{"seed": r["seed"], "time_to_target_s": _r(r["sustained"].time_s, 3),
                      "censored": r["sustained"].censored, "first_reached_s": r["time_to_target_s"],
                      "horizon_s": r["horizon"], "final_metric": _r(r["final_metric"]), "last": r["final"],
                      "speedup": _r(sp["per_seed"].get(r["seed"]), 3),
                      "final_metric_diff": _r(diff["per_seed"].get(r["seed"])),
                      **{k: r[k] for k in ("best", "deployed_metric", "sim_time_s", "trained_sparsity",
                                           "deployed_sparsity", "run_dir")}} for r in rs],
    })
    return out


def _by_seed(rs: list[dict[str, Any]], say: Any) -> list[dict[str, Any]]:
    """One run per seed (the first by directory when a seed was run twice), sorted by seed."""
    seen: dict[int, dict[str, Any]] = {}
    for r in sorted(rs, key=lambda r: (r["seed"], r["run_dir"])):
        if r["seed"] in seen:
            say(f"[fedtune] report: {r['method']} seed {r['seed']} twice; using {seen[r['seed']]['run_dir']},"
                f" leaving out {r['run_dir']}")
            continue
        seen[r["seed"]] = r
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- table


def _num(m_: Any) -> Any:
    return (lambda v: f"{v:.4f}") if m_.higher_is_better else (lambda v: f"{v:.2f}")


def _cell(a: dict[str, Any], f: Any = lambda v: f"{v:.1f}") -> str:
    """mean ± sd over seeds; one seed: its value alone (no spread to show)."""
    if a["mean"] is None:
        return "n/a"
    return f(a["mean"]) + (f" ± {f(a['std'])}" if a["n"] > 1 and a["std"] is not None else "")


def _t(v: float) -> str:
    """A time: one decimal from 100 on, else three significant digits (a tiny model's rounds last ms)."""
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"


def _ci(ci: list[float] | None, f: Any) -> str:
    return f"[{f(ci[0])}, {f(ci[1])}]" if ci else ""


_BIAS = {"upper_bound": "upper bound: the method censored", "lower_bound": "lower bound: the baseline censored",
         "mixed": "censored both ways: no bound"}


def _speedup_cell(m: dict[str, Any]) -> str:
    if m["is_baseline"]:
        return "baseline"
    if m["speedup_geomean"] is None:
        return "n/a"
    n = len(m["speedup_seeds"])
    s = f"{m['speedup_geomean']:.2f}x " + (_ci(m["speedup_ci95"], lambda v: f"{v:.2f}") if n > 1 else "(n=1, no CI)")
    if m["speedup_bias"] in _BIAS:
        s += f" ({_BIAS[m['speedup_bias']]})"
    if m["unpaired_seeds"]:
        s += f" (unpaired seeds left out: {', '.join(map(str, m['unpaired_seeds']))})"
    return s


def _diff_cell(m: dict[str, Any], f: Any) -> str:
    if m["is_baseline"]:
        return "baseline"
    if m["final_metric_diff"] is None:
        return "n/a"
    sign = (lambda v: ("+" if v >= 0 else "") + f(v))
    ci = m["final_metric_diff_ci95"]
    return sign(m["final_metric_diff"]) + (f" [{sign(ci[0])}, {sign(ci[1])}]" if ci else " (n=1, no CI)")


def _margins_cell(m: dict[str, Any]) -> str:
    if "margins" not in m:
        return "—"
    failed = [k for k, v in m["margins"].items() if v is False]
    unresolved = [k for k, v in m["margins"].items() if v is None]
    if failed:
        return "not met: " + ", ".join(failed)
    return "unresolved: " + ", ".join(unresolved) if unresolved else "met"


def _setting_markdown(entry: dict[str, Any], runs_note: list[str]) -> list[str]:
    m_ = metric_named(entry["metric"])
    fmt, short = _num(m_), m_.short
    unit = "simulated s" if entry["time_axis"] == "sim_time_s" else "rounds"
    methods, base = entry["methods"], entry["baseline"]
    how = ("declared in the setting" if entry["target_declared"]
           else "not declared: set after the runs at the least good method's mean final value")
    seeds = ", ".join(map(str, entry["seeds"])) or "none run yet"
    lines = [f"## {entry['title']}", "",
             f"Target: {short} {m_.comparator} {fmt(entry['target'])} on the server's held-out set ({how}), reached"
             f" when the running mean of the last {entry['sustain_k']} evaluations gets there; time to target in"
             f" {unit}, a run that never reaches it counts at its horizon (censored: a lower bound of its time)."
             f" Seeds are paired across methods (evaluation seeds {seeds});"
             f" speed-up = {base or 'the baseline'}'s time / the method's, per seed: geometric mean"
             f" [95% percentile bootstrap CI over seeds, {N_RESAMPLES:,} resamples]. Final {short}: the mean of a"
             f" run's last {entry['final_window']} evaluations, mean over seeds"
             + (f" (SE: the held-out set's standard error sqrt(p (1 - p) / n), n = {entry['eval_size']})"
                if entry["eval_size"] and m_.slug.endswith("accuracy") else "")
             + "; Δ final: method − baseline per seed, mean [95% CI].", ""]
    if entry["margins"]:
        lines += ["Margins declared in the setting: " + ", ".join(f"{k} {v:g}" for k, v in entry["margins"].items())
                  + " (a speed-up that is an upper bound meets no speed-up margin).", ""]
    lines += runs_note
    lines += [(f"| method | seeds | {unit} to target (geomean) | censored | speed-up vs {base or 'baseline'} [95% CI] |"
              f" final {short} | Δ final {short} vs {base or 'baseline'} [95% CI] | margins |"),
              "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        label = name + (f" ({m['chosen']})" if m.get("chosen") else "")
        t = m["time_to_target_geomean_s"]
        tcell = "n/a" if t is None else (">= " if m["censored"] else "") + _t(t)
        fin = "n/a" if m["final_metric"] is None else fmt(m["final_metric"])
        if m["final_metric_se"] is not None:
            fin += f" (SE {m['final_metric_se']:.3f})"
        lines.append(f"| {label} | {m['n_seeds']} | {tcell} | {m['censored']}/{m['n_seeds']} censored |"
                     f" {_speedup_cell(m)} | {fin} | {_diff_cell(m, fmt)} | {_margins_cell(m)} |")
    lines += ["", "Deployed models and costs (mean ± sd over seeds; one seed: its value):", "",
              (f"| method | deployed {short} | deployed latency ms (dense) | deployed size MB | bytes sent MB |"
              " peak client mem GB | sparsity trained → deployed |"), "|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        dense = m["dense_latency_ms"]["mean"]
        lat = _cell(m["latency_ms"], lambda v: f"{v:.2f}") + (f" ({dense:.2f})" if dense else "")
        lines.append(f"| {name} | {_cell(m['deployed_metric'], fmt)} | {lat} | {_cell(m['size_mb'])} |"
                     f" {_cell(m['bytes_sent_mb'])} | {_cell(m['peak_mem_gb'], lambda v: f'{v:.3f}')} |"
                     f" {_cell(m['trained_sparsity'], lambda v: f'{v:.3f}')} →"
                     f" {_cell(m['deployed_sparsity'], lambda v: f'{v:.3f}')} |")
    if entry["grid"]:
        chosen = {m.get("chosen") for m in methods.values()} - {None}
        lines += ["", ("Tuning grid, run on the tuning seeds only (not evaluation seeds); the chosen candidate then"
                  " ran on the evaluation seeds:"), "",
                  f"| candidate | tuning seeds | {unit} to target (geomean) | censored | final {short} |",
                  "|---|---|---|---|---|"]
        for k, g in sorted(entry["grid"].items()):
            t = g["time_to_target_geomean_s"]
            tcell = "n/a" if t is None else (">= " if g["censored"] else "") + _t(t)
            fin = "n/a" if g["final_metric"] is None else fmt(g["final_metric"])
            lines.append(f"| {k}{' (chosen)' if k in chosen else ''} | {', '.join(map(str, g['seeds']))} | {tcell} |"
                         f" {g['censored']}/{len(g['seeds'])} censored | {fin} |")
    return lines + [""] + [f"![{entry['setting']}]({png})" for png in entry["plots"]] + [""]


# ---------------------------------------------------------------------------------------------- plots

_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _plots(entry: dict[str, Any], main: list[dict[str, Any]], order: list[str], out: Path) -> list[str]:
    """The setting's figures, each a PNG under ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {m: {"color": plt.get_cmap("tab10")(i % 10), "ls": _STYLES[i % len(_STYLES)],
                 "marker": _MARKERS[i % len(_MARKERS)]} for i, m in enumerate(order)}
    by = {m: [r for r in main if r["method"] == m] for m in order}
    written = [_plot_curves(entry, by, order, style, out), _plot_time_to_target(entry, by, order, style, out)]
    arms = _plot_arms(entry, by, order, out)
    if arms:
        written.append(arms)
    written.append(_plot_trajectories(entry, by, order, style, out))
    return written


def _unit(entry: dict[str, Any]) -> str:
    return "simulated time (s)" if entry["time_axis"] == "sim_time_s" else "round"


def _plot_curves(entry: dict[str, Any], by: dict[str, list[dict[str, Any]]], order: list[str],
                 style: dict[str, dict[str, Any]], out: Path) -> str:
    """Per method the mean curve with a 95% CI band across seeds, on a common time grid."""
    import matplotlib.pyplot as plt

    m_ = metric_named(entry["metric"])
    bounded = m_.slug.endswith("accuracy")
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for z, m in enumerate(order):
        curves = [tuple(zip(*r["curve"])) for r in by[m] if r["curve"]]
        if not curves:
            continue
        grid, mean, lo, hi = mean_band(curves)
        st = style[m]
        n = len(curves)
        if lo is not None:
            if bounded:  # an accuracy's band stays within [0, 1]
                lo, hi = lo.clip(0.0, 1.0), hi.clip(0.0, 1.0)
            ax.fill_between(grid, lo, hi, color=st["color"], alpha=0.15, lw=0, zorder=z)
        wide = (len(order) - z) / len(order)  # drawn first, drawn widest: equal curves stay visible
        ax.plot(grid, mean, color=st["color"], ls=st["ls"], lw=1.4 + 2.2 * wide,
                zorder=len(order) + z, label=f"{m} (n={n}{'' if n > 1 else ', no band'})")
    ax.axhline(entry["target"], color="grey", ls=(0, (1, 3)), lw=1.2, label=f"target {entry['target']:g}")
    ax.set(xlabel=_unit(entry), ylabel=f"held-out {m_.short}",
           title=f"{entry['title']}:\nmean over seeds, 95% CI band")
    if not m_.higher_is_better:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{entry['setting']}-curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_time_to_target(entry: dict[str, Any], by: dict[str, list[dict[str, Any]]], order: list[str],
                         style: dict[str, dict[str, Any]], out: Path) -> str:
    """One dot per seed, censored seeds hollow at their horizon, the geometric mean as a bar."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    m_ = metric_named(entry["metric"])
    height = 1.7 + 0.55 * len(order)
    fig, ax = plt.subplots(figsize=(8, height))
    for row, m in enumerate(order):
        rs = by[m]
        st = style[m]
        for i, r in enumerate(rs):
            y = row + (0.0 if len(rs) == 1 else 0.5 * (i / (len(rs) - 1) - 0.5))
            t = r["sustained"]
            if t.censored:
                ax.plot(t.time_s, y, marker=">", ms=9, mfc="none", mec=st["color"], mew=1.6, ls="none", zorder=3)
            else:
                ax.plot(t.time_s, y, marker="o", ms=7, color=st["color"], ls="none", alpha=0.85, zorder=3)
        if entry["methods"][m]["time_to_target_geomean_s"]:
            ax.plot(entry["methods"][m]["time_to_target_geomean_s"], row, marker="|", ms=22, mew=2, color="black",
                    ls="none", zorder=2)  # under the seeds' dots
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(len(order) - 0.5, -0.5)  # first method on top, every row's dots inside the axes
    ax.set(xlabel=f"{_unit(entry)} to target ({m_.short} {m_.comparator} {entry['target']:g}, running mean of"
                  f" {entry['sustain_k']} evaluations)", title=f"{entry['title']}:\ntime to target, one dot per seed")
    fig.legend(handles=[Line2D([], [], marker="o", color="grey", ls="none", label="one seed, reached"),
                        Line2D([], [], marker=">", mfc="none", mec="grey", mew=1.6, ls="none",
                               label="one seed, censored at its horizon (a lower bound)"),
                        Line2D([], [], marker="|", ms=12, mew=2, color="black", ls="none", label="geometric mean")],
               fontsize=8, loc="lower center", ncol=3, frameon=False)  # below the axes: no dot under it
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    path = out / f"{entry['setting']}-time-to-target.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot_arms(entry: dict[str, Any], by: dict[str, list[dict[str, Any]]], order: list[str], out: Path) -> str | None:
    """The arms an adaptive policy chose, per device class (up to 4 methods whose arms vary); None if none."""
    import matplotlib.pyplot as plt

    adaptive = [m for m in order if len({(d, rk, ra) for r in by[m] for _, d, rk, ra in r["arms"]})
                > len({d for r in by[m] for _, d, _, _ in r["arms"]})][:4]
    if not adaptive:
        return None
    fig, axes = plt.subplots(len(adaptive), 2, figsize=(11, 3.4 * len(adaptive)), squeeze=False)
    for row, m in zip(axes, adaptive):
        played: dict[str, dict[int, list[tuple[int, float]]]] = {}
        for r in by[m]:
            for rnd, d, rk, ra in r["arms"]:
                played.setdefault(d, {}).setdefault(rnd, []).append((rk, ra))
        for j, (cls, per_round) in enumerate(sorted(played.items())):
            rounds = sorted(per_round)
            kw = {"ls": _STYLES[j % len(_STYLES)], "marker": _MARKERS[j % len(_MARKERS)], "ms": 4, "label": cls}
            row[0].plot(rounds, [statistics.fmean(a for a, _ in per_round[k]) for k in rounds], **kw)
            row[1].plot(rounds, [statistics.fmean(b for _, b in per_round[k]) for k in rounds], **kw)
        n = len(by[m])
        row[0].set(xlabel="round", ylabel="LoRA rank r (mean of the class's clients)",
                   title=f"{m}: rank chosen by device class ({n} seed{'s' if n > 1 else ''})")
        row[1].set(xlabel="round", ylabel="pruning ratio (fraction of weights)",
                   title=f"{m}: pruning ratio chosen by device class")
        row[0].legend(fontsize=8)
    return _save(fig, axes.ravel(), entry["title"], out / f"{entry['setting']}-arms.png")


def _plot_trajectories(entry: dict[str, Any], by: dict[str, list[dict[str, Any]]], order: list[str],
                       style: dict[str, dict[str, Any]], out: Path) -> str:
    """Sparsity, rank and bytes sent by round, mean over seeds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, m in enumerate(order):
        rs = [r for r in by[m] if r["rounds_trace"]]
        if not rs:
            continue
        st = style[m]
        wide = (len(order) - i) / len(order)  # drawn first, drawn widest: equal series stay visible as nested strokes
        kw = {"color": st["color"], "ls": st["ls"], "marker": st["marker"], "ms": 3 + 4 * wide, "lw": 1 + 2.5 * wide,
              "alpha": 0.85, "label": m}
        rounds = sorted({t["round"] for r in rs for t in r["rounds_trace"]})
        for ax, key in ((axes[0], "sparsity"), (axes[1], "rank")):
            ys = [_mean([t[key] for r in rs for t in r["rounds_trace"] if t["round"] == k]) for k in rounds]
            ax.plot(rounds, [math.nan if y is None else y for y in ys], **kw)
        n = max(len(r["bytes_by_round"]) for r in rs)
        axes[2].plot(range(n), [_mean([r["bytes_by_round"][i] / 2**20 for r in rs if i < len(r["bytes_by_round"])])
                                for i in range(n)], **kw)
    axes[0].set(xlabel="round", ylabel="sparsity (fraction of weights pruned)", title="mean sparsity of the round's clients")
    axes[1].set(xlabel="round", ylabel="LoRA rank r", title="mean LoRA rank of the round's clients")
    axes[2].set(xlabel="round", ylabel="MB sent (up + down), cumulative", title="bytes sent")
    axes[0].legend(fontsize=8)
    return _save(fig, axes, f"{entry['title']} (mean over seeds)", out / f"{entry['setting']}-trajectories.png")


def _save(fig: Any, axes: Any, title: str, path: Path) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------- report


def _setting(setting: str, srs: list[dict[str, Any]], cs: ComparisonSettings, target: float | None,
             out_dir: Path, say: Any) -> tuple[dict[str, Any], list[str]]:
    """One setting's summary entry and markdown section (plots written to ``out_dir``)."""
    metric = srs[0]["metric"]
    m_ = metric_named(metric)
    main = [r for r in srs if not r["grid_candidate"]]
    tgt = target or cs.target
    declared = tgt is not None
    tgt = tgt if declared else _auto_target(main or srs, metric)
    for r in srs:
        xs, ys = [t for t, _ in r["curve"]], [v for _, v in r["curve"]]
        r["target"] = tgt
        r["sustained"] = sustained_time(xs, ys, tgt, cs.sustain_k, m_.higher_is_better, r["horizon"])
        r["final_metric"] = final_value(ys, cs.final_window)
        r["time_to_target_s"] = time_to_target(r["records"], tgt, metric)
    names = _order({r["method"] for r in main}, main, cs.baseline)
    runs = {n: _by_seed([r for r in main if r["method"] == n], say) for n in names}
    notes: list[str] = []
    base = runs.get(cs.baseline) if cs.baseline else None
    if cs.baseline is None:
        notes.append("No baseline named in the setting: no speed-ups or paired differences.")
    elif base is None:
        notes.append(f"The baseline {cs.baseline!r} has no runs here: no speed-ups or paired differences.")
    sizes = {r["eval_size"] for r in main if r["eval_size"]}
    eval_size = min(sizes) if sizes else None
    accuracy = m_.slug.endswith("accuracy")
    methods = {n: _method_stats(rs, base, cs.baseline, cs, m_.higher_is_better, eval_size, accuracy)
               for n, rs in runs.items()}
    grid: dict[str, Any] = {}
    grid_runs: dict[str, list[dict[str, Any]]] = {}
    for name in sorted({r["method"] for r in srs if r["grid_candidate"]}):
        g = grid_runs[name] = _by_seed([r for r in srs if r["grid_candidate"] and r["method"] == name], say)
        times = [r["sustained"].time_s for r in g]
        fin = [r["final_metric"] for r in g if r["final_metric"] is not None]
        grid[name] = {"seeds": [r["seed"] for r in g], "censored": sum(r["sustained"].censored for r in g),
                      "time_to_target_s": [_r(t, 3) for t in times],
                      "time_to_target_geomean_s": _r(geomean(times), 3) if min(times) > 0 else None,
                      "final_metric": _r(statistics.fmean(fin)) if fin else None}
    entry: dict[str, Any] = {
        "setting": setting, "title": srs[0]["title"], "metric": metric, "target": tgt, "target_declared": declared,
        "sustain_k": cs.sustain_k, "final_window": cs.final_window, "baseline": cs.baseline,
        "margins": cs.margins, "time_axis": srs[0]["time_axis"],
        "seeds": sorted({r["seed"] for r in main}), "tuning_seeds": list(cs.tuning_seeds),
        "eval_size": eval_size, "sparsity": srs[0]["sparsity"],
        "bootstrap": {"resamples": N_RESAMPLES, "rng_seed": RNG_SEED, "level": 0.95, "interval": "percentile"},
        "notes": notes, "methods": methods, "grid": grid, "plots": [],
    }
    if names:
        entry["plots"] = _plots(entry, [r for n in names for r in runs[n]], names, out_dir)
    elif grid_runs:  # only a tuning grid (reproduce.py --tuning-only): its candidates are what there is to see
        entry["plots"] = _plots(dict(entry, methods=grid), [r for n in grid_runs for r in grid_runs[n]], list(grid_runs),
                                out_dir)
    return entry, _setting_markdown(entry, notes + ([""] if notes else []))


def client_eval_table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the runs' federated evaluation (their summary.json ``client_eval``): per run
    and device class, the clients of the last evaluate phase that replied (of those asked), their
    held-out examples and the example-weighted loss and accuracy or perplexity; [] when no run has one."""
    rows = [(r, r["client_eval"]) for r in runs if r.get("client_eval")]
    if not rows:
        return []
    lines = ["## Federated evaluation", "",
             ("The global adapter on the clients' own held-out splits (each under its pruning masks), in the"
              " last round that had an evaluate phase; means weighted by held-out examples."), "",
             "| run | round | device class | clients ok | examples | loss | accuracy / perplexity |",
             "|---|---|---|---|---|---|---|"]
    for r, ce in rows:
        for device, row in ce.get("by_device", {}).items():
            value = row.get("eval_accuracy", row.get("eval_perplexity"))
            loss = row.get("eval_loss")
            lines.append(f"| {r['method']} (seed {r['seed']}) | {ce.get('round')} | {device} |"
                         f" {row.get('clients', 0)}/{row.get('clients', 0) + row.get('failed', 0)} |"
                         f" {row.get('num_examples', 0)} | {'n/a' if loss is None else f'{loss:.4f}'} |"
                         f" {'n/a' if value is None else f'{value:.4f}'} |")
    return [*lines, ""]


def report(paths: list[Path], out_dir: Path, *, target: float | None = None, command: str = "",
           machine: str = "", prefer_masked: bool = True,
           settings: Mapping[str, ComparisonSettings] | None = None, say: Any = print) -> Path:
    """Write ``table.md``, ``summary.json`` and the PNGs for the runs under ``paths`` to ``out_dir``.
    ``settings``: each setting's comparison keys by setting name (default: from its runs'
    ``experiment.json``); ``target`` overrides every setting's target."""
    out_dir = Path(out_dir)
    runs = [run_stats(p, target, prefer_masked) for p in find_runs(paths, say)]
    if not runs:
        raise FileNotFoundError(f"fedtune report: no runs under {', '.join(map(str, paths))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_setting.setdefault(r["setting"], []).append(r)
    summary: dict[str, Any] = {"settings": {}, "command": command, "machine": machine,
                               "date": time.strftime("%Y-%m-%d")}
    md = ["# Comparison", ""]
    if command:
        md += [f"Made by `{command}` on {machine or 'this machine'}, {summary['date']}.", ""]
    for setting, srs in sorted(by_setting.items()):
        cs = _resolve_settings(setting, srs, (settings or {}).get(setting))
        summary["settings"][setting], section = _setting(setting, srs, cs, target, out_dir, say)
        md += section
    if fed_eval := client_eval_table(runs):
        md += fed_eval
        summary["client_eval"] = {r["run_dir"]: r["client_eval"] for r in runs if r.get("client_eval")}
        say("\n".join(fed_eval))
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir
