"""The report's statistics on hand-made runs: sustained target, censoring, pairing by seed, bootstrap CIs,
eval-set standard error, margins, and setting files that must name a baseline."""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.core.config import ConfigError
from fedtune.reporting.comparison import report
from fedtune.reporting.settings import comparison_settings, load_comparison_settings
from fedtune.reporting.stats import (
    TimeToTarget,
    binomial_se,
    bootstrap_ci,
    censoring_bias,
    final_value,
    mean_band,
    paired_difference,
    paired_speedups,
    sustained_time,
)

ROOT = Path(__file__).resolve().parents[1]

JUDGED = {"baseline": "base", "target": 0.7, "sustain_k": 3, "final_window": 2, "eval_size": 200}


def _run(root: Path, method: str, seed: int, values: list[float], *, dt: float = 10.0, setting: str = "s",
         **info) -> Path:
    """A finished run: one evaluation per round, ``dt`` simulated seconds a round."""
    d = root / setting / method / f"seed{seed}"
    d.mkdir(parents=True)
    lines = [json.dumps({"round": i, "sim_time_s": i * dt, "eval_accuracy": v, "clients": []})
             for i, v in enumerate(values)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "experiment.json").write_text(json.dumps({"setting": setting, "method": method, "seed": seed,
                                                   "metric": "eval_accuracy", "title": "T", **{**JUDGED, **info}}))
    (d / "summary.json").write_text(json.dumps({"deployment": {}}))
    return d


def _summary(out: Path, setting: str = "s") -> dict:
    return json.loads((out / "summary.json").read_text())["settings"][setting]


# ------------------------------------------------------------------------------------------- pure functions


def test_a_single_lucky_spike_does_not_reach_a_sustained_target():
    times = [0, 10, 20, 30, 40, 50, 60]
    vals = [0.5, 0.9, 0.5, 0.6, 0.8, 0.8, 0.8]
    assert sustained_time(times, vals, 0.75, k=1) == TimeToTarget(10.0, False)  # the spike, alone
    assert sustained_time(times, vals, 0.75, k=3) == TimeToTarget(60.0, False)  # mean of 0.8, 0.8, 0.8
    # perplexity: lower is better, the running mean must come down to the target
    assert sustained_time([0, 1, 2, 3], [30.0, 9.0, 30.0, 30.0], 10.0, k=2, higher_is_better=False).censored
    assert sustained_time([0, 1, 2, 3], [30.0, 9.0, 9.0, 30.0], 10.0, k=2, higher_is_better=False).time_s == 2.0


def test_a_run_that_never_reaches_is_censored_at_its_horizon():
    assert sustained_time([0, 10, 20], [0.5, 0.6, 0.65], 0.7, k=1) == TimeToTarget(20.0, True)
    assert sustained_time([0, 10], [0.5, 0.9], 0.7, k=3, horizon=25.0) == TimeToTarget(25.0, True)  # < k evals


def test_final_value_is_the_mean_of_the_last_window():
    assert final_value([0.1, 0.5, 0.7, 0.9], 2) == pytest.approx(0.8)
    assert final_value([0.6], 5) == 0.6 and final_value([], 5) is None


def test_bootstrap_with_a_fixed_seed_gives_a_fixed_ci_that_holds_the_geomean():
    method = {s: TimeToTarget(t, False) for s, t in enumerate([10.0, 20.0, 15.0, 12.0, 30.0])}
    base = {s: TimeToTarget(t, False) for s, t in enumerate([20.0, 30.0, 15.0, 30.0, 33.0])}
    a, b = paired_speedups(method, base), paired_speedups(method, base)
    ratios = [2.0, 1.5, 1.0, 2.5, 1.1]
    assert a["geomean"] == pytest.approx(math.exp(np.mean(np.log(ratios))))
    assert a["ci95"] == b["ci95"]  # the same RNG seed, the same interval
    lo, hi = a["ci95"]
    assert lo < a["geomean"] < hi and lo >= min(ratios) and hi <= max(ratios)
    assert a["ci95"] == pytest.approx([1.126614, 2.064459], abs=1e-6)  # numpy's PCG64 stream is stable
    assert a["bias"] == "none" and a["seeds"] == [0, 1, 2, 3, 4] and a["unpaired_seeds"] == []
    assert bootstrap_ci([1.0]) is None  # one seed: no interval


def test_pairing_matches_seeds_and_leaves_out_a_seed_only_one_side_ran():
    method = {0: TimeToTarget(10.0, False), 1: TimeToTarget(20.0, False), 7: TimeToTarget(5.0, False)}
    base = {0: TimeToTarget(20.0, False), 1: TimeToTarget(20.0, False), 2: TimeToTarget(99.0, False)}
    sp = paired_speedups(method, base)
    assert sp["seeds"] == [0, 1] and sp["unpaired_seeds"] == [2, 7]
    assert sp["per_seed"] == {0: 2.0, 1: 1.0} and sp["geomean"] == pytest.approx(math.sqrt(2.0))
    d = paired_difference({0: 0.8, 1: 0.7, 3: 0.9}, {0: 0.75, 1: 0.75, 2: 0.1})
    assert d["seeds"] == [0, 1] and d["mean"] == pytest.approx(0.0) and d["unpaired_seeds"] == [2, 3]


def test_censoring_says_which_way_it_biases_the_speedup():
    assert censoring_bias([False, False], [False, False]) == "none"
    assert censoring_bias([True, False], [False, False]) == "upper_bound"  # the method's time is at least this
    assert censoring_bias([False, False], [False, True]) == "lower_bound"  # the baseline's is
    assert censoring_bias([True, False], [False, True]) == "mixed"
    assert censoring_bias([True], [True]) == "mixed"


def test_eval_set_standard_error_and_mean_band():
    assert binomial_se(0.75, 200) == pytest.approx(math.sqrt(0.75 * 0.25 / 200))
    grid, mean, lo, hi = mean_band([([0, 10, 20], [0.5, 0.6, 0.7]), ([0, 5, 25], [0.5, 0.8, 0.8])], points=5)
    assert grid[0] == 0 and grid[-1] == 20  # only where every seed has data
    assert mean[0] == pytest.approx(0.5) and np.all(lo <= mean) and np.all(mean <= hi)
    assert mean_band([([0, 1], [0.1, 0.2])])[2] is None  # one seed: no band


# ------------------------------------------------------------------------------------------- settings


def test_a_setting_file_without_a_baseline_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "no-baseline.toml"
    bad.write_text('setting = "x"\nseeds = [0, 1]\ntarget = 0.7\n')
    with pytest.raises(ConfigError, match=f"{bad}: missing key 'baseline'"):
        load_comparison_settings(bad)
    # and the reproduction driver refuses it before any run
    sys.path.insert(0, str(ROOT / "simulations"))
    import reproduce

    text = (ROOT / "simulations" / "reproduce_smoke.toml").read_text()
    assert 'baseline = "best-static"\n' in text
    smoke = tmp_path / "smoke-no-baseline.toml"
    smoke.write_text(text.replace('baseline = "best-static"\n', ""))
    with pytest.raises(SystemExit, match=f"{smoke}: missing key 'baseline'"):
        reproduce.load_setting(smoke)


@pytest.mark.parametrize("table,message", [
    ({"baseline": "b", "seeds": [0, 1], "tuning_seeds": [1, 2]}, "tuning_seeds: must be disjoint .* \\[1\\]"),
    ({"baseline": "b", "sustain_k": 0}, "sustain_k: need an integer >= 1"),
    ({"baseline": "b", "margins": {"speed": 1.4}}, "margins: unknown margin 'speed'"),
    ({"baseline": ""}, "baseline: need a method name"),
])
def test_bad_comparison_keys_name_the_file_and_key(table, message):
    with pytest.raises(ConfigError, match="f.toml: " + message):
        comparison_settings(table, "f.toml")


def test_defaults_and_an_undeclared_target():
    cs = comparison_settings({"baseline": "b", "target": 0.0}, "f.toml")
    assert cs.target is None and cs.sustain_k == 3 and cs.final_window == 5 and cs.margins == {}


# ------------------------------------------------------------------------------------------- the report


def test_report_counts_censored_seeds_at_the_horizon_and_pairs_by_seed(tmp_path):
    # base reaches (running mean of 3 >= 0.7) at 40 s on every seed; fast at 20 s on seeds 0, 1;
    # fast's seed 2 never does: censored at its horizon 40 s; fast has no seed 3, base no seed 4
    up = [0.5, 0.72, 0.72, 0.72, 0.8]
    for seed in (0, 1, 2, 3):
        _run(tmp_path, "base", seed, [0.5, 0.5, 0.72, 0.72, 0.76])
    _run(tmp_path, "fast", 0, up)
    _run(tmp_path, "fast", 1, up)
    _run(tmp_path, "fast", 2, [0.5, 0.9, 0.5, 0.5, 0.6])  # a spike, never sustained
    _run(tmp_path, "fast", 4, up)
    out = report([tmp_path / "s"], tmp_path / "out")
    s = _summary(out)
    assert s["baseline"] == "base" and s["target"] == 0.7 and s["target_declared"] and s["sustain_k"] == 3
    assert list(s["methods"]) == ["base", "fast"]  # the baseline first
    f, b = s["methods"]["fast"], s["methods"]["base"]
    assert f["seeds"] == [0, 1, 2, 4] and f["censored"] == 1 and f["censored_seeds"] == [2]
    per = {p["seed"]: p for p in f["per_seed"]}
    assert per[2]["time_to_target_s"] == 40.0 and per[2]["censored"] and per[2]["first_reached_s"] == 10.0
    assert per[0]["time_to_target_s"] == 30.0  # evaluations at 10, 20, 30 s average 0.72
    assert b["censored"] == 0 and b["speedup_geomean"] is None and b["is_baseline"]
    # paired on seeds 0, 1, 2 (3: no fast run, 4: no base run)
    assert f["speedup_seeds"] == [0, 1, 2] and f["unpaired_seeds"] == [3, 4]
    assert f["speedup_geomean"] == pytest.approx((40 / 30 * 40 / 30 * 40 / 40) ** (1 / 3), abs=1e-3)
    assert f["speedup_bias"] == "upper_bound"  # seed 2's fast time is a lower bound of the truth
    lo, hi = f["speedup_ci95"]
    assert lo <= f["speedup_geomean"] <= hi
    # final metric: mean of the last 2 evaluations, paired difference with the baseline
    assert f["final_metric_diff"] == pytest.approx((0.02 * 2 + (0.55 - 0.74)) / 3, abs=1e-4)
    assert f["final_metric_diff_ci95"][0] <= f["final_metric_diff"] <= f["final_metric_diff_ci95"][1]
    assert b["final_metric_se"] == pytest.approx(math.sqrt(0.74 * 0.26 / 200), abs=1e-4)
    assert f["baseline"] == "base"
    table = (out / "table.md").read_text()
    assert "| fast | 4 | >= " in table and "| 1/4 censored |" in table and "upper bound: the method censored" in table
    assert "unpaired seeds left out: 3, 4" in table and "n = 200" in table
    assert "| base | 4 |" in table and "| 0/4 censored | baseline |" in table
    for png in s["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert {"s-curves.png", "s-time-to-target.png", "s-trajectories.png"} <= set(s["plots"])


def test_one_seed_says_so_and_margins_are_judged(tmp_path):
    margins = {"speedup_geomean": 1.2, "speedup_ci_low": 1.0, "final_metric_loss": 0.02}
    base, fast = [0.5, 0.5, 0.72, 0.72, 0.76], [0.5, 0.72, 0.72, 0.72, 0.8]
    _run(tmp_path, "base", 0, base, setting="one", margins=margins, title="One seed")
    _run(tmp_path, "fast", 0, fast, setting="one", margins=margins, title="One seed")
    for seed in (0, 1, 2):
        _run(tmp_path, "base", seed, base, setting="many", margins=margins)
        _run(tmp_path, "fast", seed, fast[:-1] + [0.8 + 0.01 * seed], setting="many", margins=margins)
    out = report([tmp_path], tmp_path / "out")
    one = _summary(out, "one")["methods"]["fast"]
    assert one["speedup_geomean"] == pytest.approx(40 / 30, abs=1e-3) and one["speedup_ci95"] is None
    assert one["margins"] == {"speedup_geomean": True, "speedup_ci_low": None, "final_metric_loss": None}
    assert one["meets_margins"] is None  # one seed cannot resolve a CI
    many = _summary(out, "many")["methods"]["fast"]
    assert many["speedup_ci95"] == pytest.approx([4 / 3, 4 / 3], abs=1e-3)  # the same ratio on every seed
    assert many["meets_margins"] is True
    table = (out / "table.md").read_text()
    one_seed = table.split("## One seed")[1].split("\n## ")[0]
    assert "1.33x (n=1, no CI)" in one_seed and not re.search(r"\d ± \d", one_seed)  # no spread from one seed
    assert "unresolved: speedup_ci_low, final_metric_loss" in table and "| met |" in table


def test_no_baseline_in_the_runs_reports_without_speedups(tmp_path):
    _run(tmp_path, "a", 0, [0.5, 0.8, 0.8, 0.8], baseline=None)
    out = report([tmp_path / "s"], tmp_path / "out")
    s = _summary(out)
    assert s["baseline"] is None and s["methods"]["a"]["speedup_geomean"] is None
    assert "No baseline named" in (out / "table.md").read_text()


def test_a_tuning_grid_alone_is_reported_and_plotted(tmp_path):
    # what `reproduce.py --tuning-only` leaves: grid candidates on the tuning seeds, no evaluation runs
    _run(tmp_path, "static-r4", 100, [0.5, 0.8, 0.8, 0.8], grid_candidate=True)
    _run(tmp_path, "static-r16", 100, [0.5, 0.6, 0.6, 0.6], grid_candidate=True)
    out = report([tmp_path / "s"], tmp_path / "out")
    s = _summary(out)
    assert s["methods"] == {} and set(s["grid"]) == {"static-r4", "static-r16"}
    assert s["grid"]["static-r16"]["censored"] == 1 and s["grid"]["static-r4"]["censored"] == 0
    assert {"s-curves.png", "s-time-to-target.png"} <= set(s["plots"])
    assert (out / "s-time-to-target.png").read_bytes()[:4] == b"\x89PNG"
    assert "(evaluation seeds none run yet)" in (out / "table.md").read_text()


def test_t_interval_uses_students_t_for_the_sample_size():
    from fedtune.reporting.stats import t_interval

    assert t_interval([0.5]) is None
    low, high = t_interval([1.0, 3.0])  # mean 2, sd sqrt(2), n 2: 12.706 * sqrt(2) / sqrt(2)
    assert (low, high) == (round(2 - 12.706, 4), round(2 + 12.706, 4))
    assert t_interval([0.0, 0.0, 0.03]) == [-0.033, 0.053]
