"""Bad input on the command line: a one-line error naming the problem, exit status 2."""

from pathlib import Path

import pytest

from fedtune.cli import main
from tests.conftest import ROOT

SMOKE = str(ROOT / "simulations" / "smoke.toml")


@pytest.mark.parametrize("args, needle", [
    (["--set", "federation.num_roundz=2"], "unknown config key 'federation.num_roundz'"),
    (["--set", "train.local_steps=many"], "train.local_steps: expected int, got str"),
    (["--set", "data.dataset=/nonexistent/reviews.jsonl"], "data.dataset: file not found: /nonexistent/reviews.jsonl"),
    (["--strategy", "fedmagic"], "federation.strategy: unknown name 'fedmagic'"),
    (["--strategy", "/nonexistent/my_strategy.py:Mine"], "plug-in file not found: /nonexistent/my_strategy.py"),
    (["--strategy", "strategies.hetlora:NoSuchClass"], "'strategies.hetlora' has no attribute 'NoSuchClass'"),
    (["--set", "fleet.devices={jetson-tx3 = 4}"], "fleet.devices: unknown device 'jetson-tx3'"),
    (["--set", "fleet.devices={jetson-tx2 = 4}", "--set", "fleet.profiles=/nonexistent/devices.toml"],
     "fleet.profiles: file not found: /nonexistent/devices.toml"),
    (["--strategy", "fedspine", "--policy", "ucb9"], "policy.name: unknown policy 'ucb9'"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys, tmp_path):
    code = main(["simulate", "--config", SMOKE, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fedtune: error: ") and needle in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing started


def test_missing_config_file(capsys, tmp_path):
    assert main(["simulate", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_config_command_prints_resolved_toml(capsys):
    assert main(["config", "--config", SMOKE, "--set", "federation.num_rounds=7", "--strategy", "flexlora"]) == 0
    out = capsys.readouterr().out
    assert "num_rounds = 7" in out and 'strategy = "flexlora"' in out


def test_strategies_command_lists_the_registry(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("fedit", "hetlora", "flexlora", "flora", "ffalora"):
        assert name in out


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedtune {version('fedtune')}"


@pytest.mark.parametrize("command", ["simulate", "deploy"])
def test_the_run_directory_is_checked_before_anything_starts(command, capsys, tmp_path):
    out = tmp_path / "run"
    assert main([command, "--config", SMOKE, "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == f"fedtune: error: --resume: no checkpoint in {out}"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main([command, "--config", SMOKE, "--out", str(out)]) == 2
    assert "not empty (a run is there); pass --resume to continue it or --force" in capsys.readouterr().err
    # --force passes the check: the next one (the strategy, in the preflight) is what stops this run
    assert main([command, "--config", SMOKE, "--out", str(out), "--force", "--strategy", "fedmagic"]) == 2
    assert "federation.strategy: unknown name 'fedmagic'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_simulate_without_config_reads_simulations_default_toml(tmp_path, monkeypatch):
    """The default experiment is the file a user edits: ``fedtune config`` (like ``simulate``) reads it."""
    import argparse

    from fedtune import cli

    assert cli.default_experiment() == Path(cli.__file__).resolve().parents[1] / "simulations" / "default.toml"
    edited = tmp_path / "default.toml"
    edited.write_text(cli.default_experiment().read_text().replace('name = "default"', 'name = "edited"'))
    monkeypatch.setattr(cli, "default_experiment", lambda: edited)
    args = argparse.Namespace(config=None, overrides=["seed=7"], strategy=None, policy=None)
    cfg = cli._load(args)
    assert cfg.name == "edited" and cfg.seed == 7


def test_version_and_provenance_name_what_produced_a_run(capsys):
    from fedtune.round.outputs import provenance

    prov = provenance()
    assert prov["fedtune"] and prov["packages"]["flwr"] == "1.42.0" and prov["python"].startswith("3.")
    if (ROOT / ".git").exists():
        assert len(prov["git_commit"].removesuffix("-dirty")) == 40
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fedtune {prov['fedtune']}"
