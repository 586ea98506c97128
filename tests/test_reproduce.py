"""The FedSpine reproduction driver (simulations/reproduce.py) and ``fedtune report``."""

import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))


def _setting():
    import reproduce

    return reproduce, reproduce.load_setting(ROOT / "simulations" / "fedspine" / "previous" / "minilm-s30.toml")


def test_every_committed_setting_builds_a_valid_config_for_every_method():
    import reproduce

    from fedtune.core.config import config_from_dict

    paths = sorted((ROOT / "simulations" / "fedspine").glob("**/*.toml")) + [ROOT / "simulations" / "reproduce_smoke.toml"]
    assert len(paths) >= 5
    for path in paths:
        s = reproduce.load_setting(path)
        for m in s["methods"]:
            names = list(reproduce.grid(s)) if m == "best-static" else [m]
            for name in names:
                cfg = config_from_dict(reproduce.method_config(s, name, s["seeds"][0], reproduce.static_of(s, name)))
                assert cfg.deploy_sparsity == pytest.approx(s["sparsity"]), (path.name, name)
                assert cfg.fleet.devices == s["experiment"]["fleet"]["devices"]


def test_methods_differ_where_the_issue_says():
    reproduce, s = _setting()
    fs = reproduce.method_config(s, "fedspine", 0)
    assert fs["policy"]["name"] == "s-ucb" and fs["policy"]["ratio_mode"] == "step"
    assert fs["policy"]["ratios"] == [0.15, 0.3]
    het = reproduce.method_config(s, "hetlora", 0)
    assert het["federation"]["strategy_args"]["aggregation"] == "hetlora"
    assert het["policy"]["args"]["arms"]["jetson-tx2"] == [0.3, 4]
    fedit = reproduce.method_config(s, "fedit", 1)
    assert fedit["federation"]["strategy"] == "fedit" and fedit["lora"]["ranks"] == [4] and fedit["seed"] == 1
    assert set(reproduce.grid(s)) == {"static-r4", "static-r8", "static-r16"}


def test_hidden_fleet_setting_runs_the_cost_aware_bandit_datasheet_static_and_a_gradual_grid():
    import reproduce

    from fedtune.core.config import config_from_dict

    s = reproduce.load_setting(ROOT / "simulations" / "fedspine" / "minilm-hidden.toml")
    cu = config_from_dict(reproduce.method_config(s, "cost-ucb", 0))
    assert cu.policy.name == "cost-ucb" and cu.policy.ratio_mode == "step" and cu.fleet.hidden_link == [0.25, 4.0]
    assert cu.data.eval_size == 500 and cu.data.eval_stratify == "label"
    # static by class from datasheets: the cost model's per-class arm from nominal speeds, pruned in steps
    assert set(s["datasheet_arms"]) == set(s["class_ranks"])
    sheet = config_from_dict(reproduce.method_config(s, "static-by-class", 0, reproduce.static_of(s, "static-by-class")))
    assert sheet.policy.name == "static" and sheet.policy.ratio_mode == "step"
    assert {c: list(a) for c, a in sheet.policy.args["arms"].items()} == s["datasheet_arms"]
    assert list(reproduce.grid(s)) == ["static-r4", "static-r16", "static-r4-gradual", "static-r16-gradual"]
    at_once = reproduce.method_config(s, "static-r16", 0, reproduce.static_of(s, "static-r16"))["policy"]
    gradual = reproduce.method_config(s, "static-r16-gradual", 0, reproduce.static_of(s, "static-r16-gradual"))["policy"]
    assert at_once["ratio_mode"] == "target" and at_once["args"]["arms"]["jetson-tx2"] == [0.3, 16]
    assert gradual["ratio_mode"] == "step" and gradual["args"]["arms"]["jetson-tx2"] == [0.15, 16]
    # the bandits and the baseline on every evaluation seed, the other methods on the first one
    assert reproduce.seeds_of(s, "cost-ucb") == reproduce.seeds_of(s, "best-static") == [0, 1, 2, 3, 4]
    assert reproduce.seeds_of(s, "hetlora") == [0] and reproduce.seeds_of(s, "static-by-class") == [0]
    tuning, evaluation = reproduce.plan([s])
    assert len(tuning) == 4 * 3 and {seed for _, _, seed in tuning} == {100, 101, 102}
    order = [(m, seed) for _, m, seed in evaluation]
    # every-seed methods (the bandits, the best static, and rank 4 at once as a method of its own), seed by seed
    assert order[:4] == [("cost-ucb", 0), ("fedspine", 0), ("best-static", 0), ("static-r4", 0)]
    assert order.index(("static-r4", 4)) < order.index(("hetlora", 0)) and len(order) == 4 * 5 + 5 * 1


@pytest.mark.parametrize("old,new,message", [
    ('methods = ["fedspine"', 'methods = ["fedprox"', "unknown method 'fedprox'"),
    ("local_steps = 4", "local_step = 4", "local_step"),
    ('metric = "eval_accuracy"', 'metric = "acc"', "metric: 'eval_accuracy' or 'eval_perplexity', got 'acc'"),
    (", jetson-agx-xavier = 4 }", " }", "class_ranks: no rank for device class 'jetson-agx-xavier'"),
    ("tuning_seeds = [2]", "tuning_seeds = [1, 2]", "tuning_seeds: must be disjoint from the evaluation seeds"),
    ("tuning_seeds = [2]", "tuning_seeds = []", "tuning_seeds: best-static is tuned on them"),
    ('baseline = "best-static"', 'baseline = "fedit"', "baseline: 'fedit' is not one of the methods"),
    ('baseline = "best-static"\n', "", "missing key 'baseline'"),
    ("tuning_seeds = [2]", 'tuning_seeds = [2]\nmethod_seeds = { fedit = 1 }', "method_seeds: 'fedit' is not one of"),
    ("tuning_seeds = [2]", 'tuning_seeds = [2]\nmethod_seeds = { fedspine = 3 }', r"method_seeds.fedspine: need an integer in \[1, 2\]"),
    ("tuning_seeds = [2]", 'tuning_seeds = [2]\ngrid_schedules = ["slowly"]', "grid_schedules: unknown schedule 'slowly'"),
])
def test_a_bad_setting_names_the_key(tmp_path, old, new, message):
    import reproduce

    text = (ROOT / "simulations" / "reproduce_smoke.toml").read_text()
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(SystemExit, match=message):
        reproduce.load_setting(bad)


def test_best_static_is_chosen_on_the_tuning_seeds_only(tmp_path):
    import reproduce

    s = reproduce.load_setting(ROOT / "simulations" / "reproduce_smoke.toml")
    s["target"] = 0.7
    s["comparison"] = replace(s["comparison"], target=0.7)

    def run(name: str, seed: int, accs: list[float]) -> None:
        d = tmp_path / "smoke" / name / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"round": i, "sim_time_s": 10.0 * i, "eval_accuracy": a})
                                                 + "\n" for i, a in enumerate(accs)))
        (d / "summary.json").write_text("{}")

    # on the tuning seed 2, static-r4 sustains 0.7 first; on evaluation seed 0 (never read) static-r2 would
    run("static-r2", 2, [0.5, 0.6, 0.7, 0.75])
    run("static-r4", 2, [0.5, 0.75, 0.75, 0.75])
    run("static-r2", 0, [0.9, 0.9, 0.9, 0.9])
    assert reproduce.best_static(s, tmp_path) == "static-r4"
    # reaching it beats a shorter run that never does
    run("static-r2", 3, [0.5, 0.5])
    run("static-r4", 3, [0.5, 0.6, 0.6, 0.6, 0.7, 0.7])
    s["comparison"] = replace(s["comparison"], tuning_seeds=(3,))
    assert reproduce.best_static(s, tmp_path) == "static-r4"  # r2: censored at 10 s, r4: reached at 50 s
    s["comparison"] = replace(s["comparison"], tuning_seeds=(2,))
    # neither reaches it: both censored at the horizon, the better final accuracy wins
    s["comparison"] = replace(s["comparison"], target=0.99)
    assert reproduce.best_static(s, tmp_path) == "static-r4"


def test_report_of_a_missing_folder_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtune", "report", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope is not a run directory" in proc.stderr


@pytest.mark.integration
def test_scaled_down_reproduction_runs_resumes_and_reports(tmp_path, shared_ray):
    runs, out = tmp_path / "runs", tmp_path / "report"
    cmd = [sys.executable, "simulations/reproduce.py", "--settings", "simulations/reproduce_smoke.toml",
           "--runs-dir", str(runs), "--out", str(out), "--ray-address", shared_ray]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 runs" in proc.stdout and "smoke/fedspine/seed1" in proc.stdout  # progress bar names the run
    summary = json.loads((out / "summary.json").read_text())
    setting = summary["settings"]["smoke"]
    assert list(setting["methods"]) == ["best-static", "fedspine", "flexlora"]  # the baseline first
    assert setting["baseline"] == "best-static" and setting["sustain_k"] == 2 and setting["final_window"] == 2
    assert not setting["target_declared"] and setting["eval_size"] == 64 and setting["tuning_seeds"] == [2]
    assert setting["metric"] == "masked_eval_accuracy"  # pruning runs: measured under the devices' masks
    assert set(setting["grid"]) == {"static-r2", "static-r4"}
    assert all(g["seeds"] == [2] for g in setting["grid"].values())  # tuned on the tuning seed only
    chosen = setting["methods"]["best-static"]["chosen"]
    assert chosen in setting["grid"]
    for m in setting["methods"].values():
        assert m["seeds"] == [0, 1] and m["n_seeds"] == 2 and m["baseline"] == "best-static"
        assert 0.0 <= m["final_metric"] <= 1.0 and 0 <= m["censored"] <= 2
        assert m["deployed_sparsity"]["mean"] == pytest.approx(setting["methods"]["fedspine"]["deployed_sparsity"]["mean"])
        assert {"speedup_geomean", "speedup_ci95", "final_metric_diff_ci95"} <= set(m)
        assert m["bytes_sent_mb"]["mean"] > 0
    fs = setting["methods"]["fedspine"]
    assert fs["speedup_seeds"] == [0, 1] and fs["speedup_geomean"] > 0
    assert fs["speedup_ci95"][0] <= fs["speedup_geomean"] <= fs["speedup_ci95"][1]
    # the best static ran fresh on the evaluation seeds; the grid never ran on them
    first = json.loads((runs / "smoke" / "best-static" / "seed0" / "experiment.json").read_text())
    assert first["method"] == "best-static" and first["chosen"] == chosen and first["baseline"] == "best-static"
    assert not (runs / "smoke" / chosen / "seed0").exists()
    table = (out / "table.md").read_text()
    assert "| fedspine | 2 |" in table and f"| best-static ({chosen}) | 2 |" in table
    assert "speed-up vs best-static" in table and "/2 censored" in table
    for png in setting["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert {"smoke-curves.png", "smoke-time-to-target.png", "smoke-trajectories.png"} <= set(setting["plots"])

    # a second call finds every run done and only reports again; a removed run is redone
    import shutil

    shutil.rmtree(runs / "smoke" / "flexlora" / "seed1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke/flexlora/seed1:" in proc.stdout and "smoke/fedspine/seed0:" not in proc.stdout
    # fedtune report on the run folders directly
    rep = subprocess.run([sys.executable, "-m", "fedtune", "report", str(runs / "smoke"), "--out", str(tmp_path / "r2"),
                          "--target", "0.5"], cwd=ROOT, capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    again = json.loads((tmp_path / "r2" / "summary.json").read_text())["settings"]["smoke"]
    assert again["target"] == 0.5
    cfg = tomllib.loads((runs / "smoke" / "fedspine" / "seed0" / "config.toml").read_text())
    assert cfg["policy"]["name"] == "s-ucb"


def test_a_failed_run_stops_the_side_by_side_runs_not_yet_started(tmp_path, monkeypatch):
    import reproduce

    started = []

    def fake_run_one(s, method, seed, runs, cfg, meta, log, ray_address="", ray_tmpdir=""):
        started.append((method, seed, ray_tmpdir))
        if method == "fedspine" and seed == 0:
            raise SystemExit("reproduce: smoke/fedspine/seed0 failed (exit 1)")
        time.sleep(0.5)  # the others take a while: the failure is seen while they run
        return runs / method / f"seed{seed}"

    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    monkeypatch.setattr(reproduce, "best_static", lambda s, runs: "static-r2")
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--settings", str(ROOT / "simulations" / "reproduce_smoke.toml"),
                                      "--runs-dir", str(tmp_path), "--jobs", "2", "--no-report"])
    with pytest.raises(SystemExit, match="fedspine/seed0 failed"):
        reproduce.main()
    # the grid on the tuning seed first, then evaluation seed 0; seed 1's runs never start
    assert [m for m, _, _ in started[:2]] == ["static-r2", "static-r4"]
    assert all(seed != 1 for _, seed, _ in started), started
    assert {t for _, _, t in started} <= {f"/tmp/fedtune-ray-{os.getpid()}-0", f"/tmp/fedtune-ray-{os.getpid()}-1"}


def test_a_grid_candidate_named_as_a_method_runs_on_the_evaluation_seeds_as_a_method(tmp_path, monkeypatch):
    import reproduce

    text = (ROOT / "simulations" / "reproduce_smoke.toml").read_text()
    assert 'methods = ["fedspine"' in text
    path = tmp_path / "smoke.toml"
    path.write_text(text.replace('methods = ["fedspine"', 'methods = ["static-r4", "fedspine"'))
    s = reproduce.load_setting(path)
    tuning, evaluation = reproduce.plan([s])
    assert {seed for _, m, seed in tuning if m == "static-r4"} == set(s["tuning_seeds"])
    assert {seed for _, m, seed in evaluation if m == "static-r4"} == set(s["seeds"])
    metas = {}

    def fake_run_one(s, method, seed, runs, cfg, meta, log, ray_address="", ray_tmpdir=""):
        metas[(method, seed)] = meta
        return runs / method / f"seed{seed}"

    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    monkeypatch.setattr(reproduce, "best_static", lambda s, runs: "static-r2")
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--settings", str(path), "--runs-dir", str(tmp_path / "runs"),
                                      "--no-report"])
    reproduce.main()
    # a grid candidate on the tuning seeds (best-static's choice), a method of its own on the evaluation seeds
    assert all(metas[("static-r4", seed)]["grid_candidate"] for seed in s["tuning_seeds"])
    assert not any(metas[("static-r4", seed)]["grid_candidate"] for seed in s["seeds"])
    assert metas[("best-static", s["seeds"][0])]["chosen"] == "static-r2"
    # a name neither a method nor in the grid is an error that lists both
    path.write_text(text.replace('methods = ["fedspine"', 'methods = ["static-r32", "fedspine"'))
    with pytest.raises(SystemExit, match="unknown method 'static-r32'.*best-static's grid: static-r2, static-r4"):
        reproduce.load_setting(path)
