"""``fedtune report`` on hand-made runs: per-run figures, paired speed-ups against the baseline, censoring,
directions, the table and the plots (the statistics themselves: tests/test_report_stats.py)."""

import json
from pathlib import Path

import pytest

from fedtune.core.metric import time_to_target
from fedtune.reporting.comparison import report, run_stats


def _run(root: Path, method: str, seed: int, curve: list[tuple[float, float]], *, metric: str = "eval_accuracy",
         target: float = 0.7, setting: str = "s", deployed: float = 0.3, baseline: str = "flexlora") -> Path:
    d = root / setting / method / f"seed{seed}"
    d.mkdir(parents=True)
    lines = []
    for i, (t, v) in enumerate(curve):
        clients = [] if i == 0 else [{"client_id": 0, "status": "ok", "rank": 4 + seed, "device": "jetson-tx2",
                                      "prune_ratio": 0.1 * i, "arm": {"ratio": 0.15 * i, "rank": 4},
                                      "peak_mem_gb": 0.2},
                                     {"client_id": 1, "status": "failed"}]
        lines.append(json.dumps({"round": i, "sim_time_s": t, metric: v, "wall_time_s": float(i), "clients": clients,
                                 "bytes_up": 2**20, "bytes_down": 2**20}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "experiment.json").write_text(json.dumps({"setting": setting, "method": method, "seed": seed, "metric": metric,
                                                   "target": target, "sparsity": 0.3, "title": "T",
                                                   "baseline": baseline, "sustain_k": 1, "final_window": 1}))
    (d / "summary.json").write_text(json.dumps({"deployment": {"trained_sparsity": deployed - 0.05,
                                                               "deployed_sparsity": deployed, metric: curve[-1][1],
                                                               "latency_ms": 2.0, "dense_latency_ms": 3.0,
                                                               "size_mb": 10.0}}))
    return d


def test_time_to_target_reads_perplexity_from_above():
    recs = [{"sim_time_s": 0.0, "eval_perplexity": 40.0}, {"sim_time_s": 5.0, "eval_perplexity": 19.0}]
    assert time_to_target(recs, 20.0, "eval_perplexity") == 5.0
    assert time_to_target(recs, 10.0, "eval_perplexity") is None
    assert time_to_target([{"sim_time_s": 3.0, "eval_accuracy": 0.8}], 0.7) == 3.0


def test_paired_speedups_censoring_and_table(tmp_path):
    # fedspine reaches 0.7 at 10 s and 20 s; the baseline flexlora at 30 s and 30 s; fedit never (seed 0)
    _run(tmp_path, "fedspine", 0, [(0, 0.5), (10, 0.72), (20, 0.74)])
    _run(tmp_path, "fedspine", 1, [(0, 0.5), (10, 0.6), (20, 0.70)])
    _run(tmp_path, "flexlora", 0, [(0, 0.5), (30, 0.7), (60, 0.76)])
    _run(tmp_path, "flexlora", 1, [(0, 0.5), (30, 0.7), (60, 0.7)])
    _run(tmp_path, "fedit", 0, [(0, 0.5), (40, 0.6), (80, 0.65)])
    (_run(tmp_path, "fedit", 1, [(0, 0.5), (40, 0.9)]) / "summary.json").unlink()  # unfinished: left out
    st = run_stats(tmp_path / "s" / "fedspine" / "seed0")
    assert st["time_to_target_s"] == 10 and st["final"] == 0.74 and st["best"] == 0.74
    assert st["sustained"].time_s == 10 and not st["sustained"].censored and st["final_metric"] == 0.74
    assert st["bytes_sent"] == 6 * 2**20 and st["failed_client_rounds"] == 2 and st["peak_mem_gb"] == 0.2
    assert st["arms_by_class"]["jetson-tx2"][1] == (4.0, 0.15)
    out = report([tmp_path / "s"], tmp_path / "out")
    s = json.loads((out / "summary.json").read_text())["settings"]["s"]
    m = s["methods"]
    assert list(m) == ["flexlora", "fedit", "fedspine"]  # the baseline first
    assert m["fedspine"]["speedup_geomean"] == pytest.approx(4.5 ** 0.5, abs=1e-3)  # 30/10 and 30/20
    assert m["fedspine"]["speedup_ci95"] == pytest.approx([1.5, 3.0], abs=1e-3)
    assert m["fedspine"]["time_to_target_geomean_s"] == pytest.approx(200 ** 0.5, abs=1e-3)
    assert m["flexlora"]["is_baseline"] and m["flexlora"]["speedup_geomean"] is None
    f = m["fedit"]
    assert f["seeds"] == [0] and f["censored"] == 1 and f["speedup_geomean"] == pytest.approx(30 / 80)
    assert f["speedup_bias"] == "upper_bound" and f["unpaired_seeds"] == [1] and f["speedup_ci95"] is None
    assert m["fedspine"]["final_metric"] == pytest.approx(0.72)
    assert m["fedspine"]["final_metric_diff"] == pytest.approx(-0.01)  # -0.02 and 0.0 per seed
    assert m["fedspine"]["final_metric_diff_ci95"] == pytest.approx([-0.02, 0.0])
    table = (out / "table.md").read_text()
    assert "| fedspine | 2 | 14.1 | 0/2 censored | 2.12x [1.50, 3.00] |" in table
    assert "| fedit | 1 | >= 80 | 1/1 censored | 0.38x (n=1, no CI) (upper bound: the method censored)" in table
    assert "0.250 → 0.300" in table
    assert {"s-curves.png", "s-time-to-target.png", "s-arms.png", "s-trajectories.png"} == set(s["plots"])
    for png in s["plots"]:
        assert (out / png).stat().st_size > 1000


def test_lower_bound_when_the_baseline_is_censored_and_auto_perplexity_target(tmp_path):
    _run(tmp_path, "fedspine", 0, [(0, 0.5), (10, 0.75)], setting="a", baseline="fedit")
    _run(tmp_path, "fedit", 0, [(0, 0.5), (40, 0.6)], setting="a", baseline="fedit")
    _run(tmp_path, "fedspine", 0, [(0, 50.0), (10, 17.0), (20, 15.0)], metric="eval_perplexity", target=0.0,
         setting="b", baseline="fedit")
    _run(tmp_path, "fedit", 0, [(0, 50.0), (10, 30.0), (20, 18.0)], metric="eval_perplexity", target=0.0,
         setting="b", baseline="fedit")
    out = report([tmp_path], tmp_path / "out")
    s = json.loads((out / "summary.json").read_text())["settings"]
    a = s["a"]["methods"]["fedspine"]
    assert a["speedup_geomean"] == 4.0 and a["speedup_bias"] == "lower_bound"  # fedit's whole 40 s / 10 s
    assert s["b"]["target"] == 18.0 and not s["b"]["target_declared"]  # the worse final perplexity
    b = s["b"]["methods"]
    assert b["fedspine"]["per_seed"][0]["time_to_target_s"] == 10.0 and b["fedit"]["per_seed"][0]["time_to_target_s"] == 20.0
    assert b["fedspine"]["final_metric"] == 15.0 and b["fedspine"]["speedup_geomean"] == 2.0
    assert b["fedspine"]["final_metric_se"] is None  # a perplexity has no binomial standard error
    table = (out / "table.md").read_text()
    assert "4.00x (n=1, no CI) (lower bound: the baseline censored)" in table and "not declared" in table
