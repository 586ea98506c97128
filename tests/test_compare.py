"""``fedtune report`` arithmetic on hand-made runs: time to target, speed-ups, seeds, directions."""

import json
from pathlib import Path

import pytest

from fedtune.core.metric import time_to_target
from fedtune.reporting.comparison import report, run_stats


def _run(root: Path, method: str, seed: int, curve: list[tuple[float, float]], *, metric: str = "eval_accuracy",
         target: float = 0.7, setting: str = "s", deployed: float = 0.3) -> Path:
    d = root / setting / method / f"seed{seed}"
    d.mkdir(parents=True)
    lines = []
    for i, (t, v) in enumerate(curve):
        clients = [] if i == 0 else [{"client_id": 0, "status": "ok", "rank": 4 + seed, "device": "jetson-tx2",
                                      "prune_ratio": 0.1 * i, "arm": {"ratio": 0.15, "rank": 4}, "peak_mem_gb": 0.2},
                                     {"client_id": 1, "status": "failed"}]
        lines.append(json.dumps({"round": i, "sim_time_s": t, metric: v, "wall_time_s": float(i), "clients": clients,
                                 "bytes_up": 2**20, "bytes_down": 2**20}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "experiment.json").write_text(json.dumps({"setting": setting, "method": method, "seed": seed, "metric": metric,
                                                   "target": target, "sparsity": 0.3, "title": "T"}))
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


def test_speedups_seed_means_and_table(tmp_path):
    # fedspine reaches 0.7 at 10 s and 20 s (mean 15); flexlora at 30 s and 30 s; fedit never
    _run(tmp_path, "fedspine", 0, [(0, 0.5), (10, 0.72), (20, 0.74)])
    _run(tmp_path, "fedspine", 1, [(0, 0.5), (10, 0.6), (20, 0.70)])
    _run(tmp_path, "flexlora", 0, [(0, 0.5), (30, 0.7), (60, 0.76)])
    _run(tmp_path, "flexlora", 1, [(0, 0.5), (30, 0.7), (60, 0.7)])
    _run(tmp_path, "fedit", 0, [(0, 0.5), (40, 0.6), (80, 0.65)])
    (_run(tmp_path, "fedit", 1, [(0, 0.5), (40, 0.9)]) / "summary.json").unlink()  # unfinished: left out
    st = run_stats(tmp_path / "s" / "fedspine" / "seed0")
    assert st["time_to_target_s"] == 10 and st["final"] == 0.74 and st["best"] == 0.74
    assert st["bytes_sent"] == 6 * 2**20 and st["failed_client_rounds"] == 2 and st["peak_mem_gb"] == 0.2
    assert st["arms_by_class"]["jetson-tx2"][1] == (4.0, 0.15)
    out = report([tmp_path / "s"], tmp_path / "out")
    s = json.loads((out / "summary.json").read_text())["settings"]["s"]
    m = s["methods"]
    assert m["fedspine"]["time_to_target_s"] == 15.0 and m["fedspine"]["time_to_target"]["std"] == pytest.approx(7.0711)
    assert m["fedspine"]["speedup_vs_best_baseline"] == 2.0  # 30 / 15
    assert m["flexlora"]["speedup_vs_best_baseline"] == 0.5
    assert m["fedit"]["seeds"] == 1
    assert m["fedit"]["speedup_vs_best_baseline"] is None and m["fedit"]["time_to_target"]["n"] == 0 and m["fedit"]["time_to_target_s"] is None
    assert m["fedspine"]["final_accuracy"] == pytest.approx(0.72)
    assert m["fedspine"]["final_vs_best_baseline"] == pytest.approx(0.72 - 0.73)
    table = (out / "table.md").read_text()
    assert "| fedspine | 15.0 ± 7.1 | 2.00x |" in table
    assert "| fedit | never |" in table and "0.250 → 0.300" in table
    assert "NOT met" in table  # 2x faster but 1 point lower in final accuracy
    for png in s["plots"]:
        assert (out / png).stat().st_size > 1000


def test_lower_bound_when_no_other_method_reaches_and_auto_perplexity_target(tmp_path):
    _run(tmp_path, "fedspine", 0, [(0, 0.5), (10, 0.75)], setting="a")
    _run(tmp_path, "fedit", 0, [(0, 0.5), (40, 0.6)], setting="a")
    _run(tmp_path, "fedspine", 0, [(0, 50.0), (10, 17.0), (20, 15.0)], metric="eval_perplexity", target=0.0, setting="b")
    _run(tmp_path, "fedit", 0, [(0, 50.0), (10, 30.0), (20, 18.0)], metric="eval_perplexity", target=0.0, setting="b")
    out = report([tmp_path], tmp_path / "out")
    s = json.loads((out / "summary.json").read_text())["settings"]
    a = s["a"]["methods"]["fedspine"]
    assert a["speedup_vs_best_baseline"] == 4.0 and a["speedup_is_lower_bound"]  # fedit's whole 40 s / 10 s
    assert s["b"]["target"] == 18.0  # the worse final perplexity: every method gets there
    b = s["b"]["methods"]
    assert b["fedspine"]["time_to_target_s"] == 10.0 and b["fedit"]["time_to_target_s"] == 20.0
    assert b["fedspine"]["final_perplexity"] == 15.0 and b["fedspine"]["speedup_vs_best_baseline"] == 2.0
    assert ">= 4.00x" in (out / "table.md").read_text()
