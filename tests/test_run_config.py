"""Flower run config -> experiment config: `flwr run . --run-config "federation.num-rounds=5"`."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedtune.core.config import ConfigError, load_config
from fedtune.core.explain import REGENERATE, config_fields, run_config_key
from fedtune.deploy.processes import flwr_env, free_port
from fedtune.round.server_app import APP_KEYS, experiment_overrides, resolve_key
from tests.conftest import ROOT

SMOKE = ROOT / "simulations" / "smoke.toml"


def app_config() -> dict:
    """pyproject.toml's run config as Flower flattens it (dotted keys)."""
    return flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def test_hyphens_and_underscores_name_the_same_nested_key():
    rc = {"experiment": "simulations/smoke.toml", "out-dir": "runs/x", "resume": False,
          "federation.num-rounds": 5, "train.learning_rate": 0.01, "model.max-length": 48, "lora.rslora": True}
    assert experiment_overrides(rc) == ["federation.num_rounds=5", "train.learning_rate=0.01",
                                        "model.max_length=48", "lora.rslora=true"]
    cfg = load_config(SMOKE, experiment_overrides(rc))
    assert (cfg.federation.num_rounds, cfg.train.learning_rate, cfg.model.max_length, cfg.lora.rslora) == (
        5, 0.01, 48, True)
    assert cfg.lora.ranks == [2, 4]  # untouched keys keep the experiment file's values


def test_empty_values_leave_keys_unset():
    assert experiment_overrides({"federation.num-rounds": "", "name": " ", "overrides": "seed=3"}) == []


def test_lists_and_tables_travel_as_toml_strings_and_strings_stay_strings():
    rc = {"lora.ranks": "[8, 16]", "lora.rank-overrides": "{1 = 4}", "name": "123", "model.name": "tiny-bert",
          "data.partitioner-args": "{alpha = 0.5}"}
    cfg = load_config(SMOKE, experiment_overrides(rc))
    assert cfg.lora.ranks == [8, 16] and cfg.lora.rank_overrides == {"1": 4}
    assert cfg.name == "123" and cfg.model.name == "tiny-bert"
    assert cfg.data.partitioner_args == {"alpha": 0.5}


def test_table_entries_keep_their_own_keys():
    assert resolve_key("fleet.devices.jetson-tx2") == ("fleet.devices.jetson-tx2", int)
    assert resolve_key("model.quantization-by-device.jetson-tx2") == ("model.quantization_by_device.jetson-tx2", str)
    assert experiment_overrides({"model.quantization-by-device.jetson-tx2": "nf4"}) == [
        'model.quantization_by_device.jetson-tx2="nf4"']


def test_an_unknown_key_names_itself_and_the_known_keys():
    with pytest.raises(ConfigError) as err:
        experiment_overrides({"federation.num-roundz": 5})
    assert "'federation.num-roundz'" in str(err.value) and "num-rounds" in str(err.value)
    with pytest.raises(ConfigError, match="'trian'"):
        experiment_overrides({"trian.learning-rate": 0.1})


@pytest.mark.parametrize(("rc", "key"), [({"federation.num-rounds": "many"}, "federation.num_rounds"),
                                         ({"lora.ranks": "[8, -1]"}, "lora.ranks"),
                                         ({"train.learning-rate": -1.0}, "train.learning_rate"),
                                         ({"model.task": "regression"}, "model.task")])
def test_a_bad_value_is_refused_as_set_refuses_it(rc, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE, experiment_overrides(rc))


def test_pyproject_declares_every_experiment_key_unset():
    declared = {k: v for k, v in app_config().items() if k not in APP_KEYS}
    expected = {run_config_key(f.key) for f in config_fields() if not f.section}
    assert set(declared) == expected, (
        f"pyproject.toml's [tool.flwr.app.config] is out of date with fedtune/core/config.py (missing:"
        f" {sorted(expected - set(declared))}, stale: {sorted(set(declared) - expected)}); run `{REGENERATE}`")
    assert set(declared.values()) == {""}
    assert all(resolve_key(k) for k in declared)


def test_flowers_own_parser_and_key_check_feed_the_mapping():
    """What `flwr run --run-config` sends, fused with the app's config as the SuperLink fuses it."""
    line = ("federation.num-rounds=1 lora.ranks='[8,16]' train.learning-rate=0.01"
            " fleet.devices='{jetson-tx2=4}' model.name=\"tiny-bert\"")
    overrides = parse_config_args([line])
    fused = fuse_dicts(app_config(), overrides, check_keys=True)
    cfg = load_config(SMOKE, experiment_overrides(fused))
    assert (cfg.federation.num_rounds, cfg.lora.ranks, cfg.train.learning_rate) == (1, [8, 16], 0.01)
    assert cfg.fleet.devices == {"jetson-tx2": 4}
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(app_config(), parse_config_args(["federation.num_roundz=1"]), check_keys=True)
    with pytest.raises(ValueError, match="needs to be of type"):  # unquoted lists are Flower's to refuse
        parse_config_args(["lora.ranks=[8,16]"])


@pytest.mark.integration
def test_flwr_run_maps_experiment_keys_through_a_simulation_superlink(tmp_path):
    """`flwr run . --run-config` with experiment keys on a real simulation SuperLink: an undeclared key
    is refused before anything runs; the declared ones reach the experiment (1 round, rank 2)."""
    port, home = free_port(), tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    bindir = os.path.dirname(sys.executable)
    env = flwr_env(home, {"RAY_TMPDIR": "/tmp/fedtune-ray-rc"})

    def flwr(*args, timeout=60):
        return subprocess.run([f"{bindir}/flwr", *args], check=False, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)

    with open(tmp_path / "superlink.log", "w") as log:
        link = subprocess.Popen(
            [f"{bindir}/flower-superlink", "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "run"
    try:
        time.sleep(5)
        bad = flwr("run", ".", "sim", "--run-config", "federation.num-roundz=1", "--format", "json")
        refused = json.loads(bad.stdout)  # `flwr run --format json` exits 0 either way
        assert not refused["success"] and "Invalid run configuration" in refused["error-message"], refused
        assert "Key 'federation.num-roundz' is not present" in (tmp_path / "superlink.log").read_text()
        run = flwr("run", ".", "sim", "--stream", "--run-config",
                   f"experiment=\"simulations/smoke.toml\" out-dir=\"{out}\" federation.num-rounds=1"
                   " lora.ranks='[2]' train.learning-rate=0.004 name=\"rc\"",
                   "--federation-config", "num-supernodes=4 client-resources-num-cpus=1", timeout=400)
        assert "round   1/1" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
        runs = json.loads(flwr("ls", "sim", "--format", "json").stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"]  # the refused run was never created
        resolved = tomllib.loads((out / "config.toml").read_text())
        assert resolved["federation"]["num_rounds"] == 1 and resolved["lora"]["ranks"] == [2]
        assert resolved["train"]["learning_rate"] == 0.004 and resolved["name"] == "rc"
        assert resolved["model"]["name"] == "tiny-bert"  # from the experiment file
        assert json.loads((out / "summary.json").read_text())["rounds"] == 1
        assert (out / "adapter" / "adapter_config.json").is_file()
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
