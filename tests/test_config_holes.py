"""Values that used to get past the config checks: each is now one line naming the key, exit status 2,
from ``simulate`` and from the commands that run the same checks (``config``, ``deploy``)."""

import pytest

from fedtune.cli import main
from fedtune.core.config import ConfigError, load_config, ray_host_port
from tests.conftest import ROOT

SMOKE = str(ROOT / "simulations" / "smoke.toml")  # 4 clients, all sampled every round

BAD = {
    "lora-alpha-zero": (["lora.alpha=0"], "lora.alpha: must be a finite number > 0, got 0.0"),
    "lora-alpha-negative": (["lora.alpha=-8"], "lora.alpha: must be a finite number > 0, got -8.0"),
    "lora-alpha-nan": (["lora.alpha=nan"], "lora.alpha: must be a finite number > 0, got nan"),
    "lora-alpha-inf": (["lora.alpha=inf"], "lora.alpha: must be a finite number > 0, got inf"),
    "round-timeout-inf": (["federation.round_timeout_s=inf"], "federation.round_timeout_s: must be a finite number"),
    "round-timeout-nan": (["federation.round_timeout_s=nan"], "federation.round_timeout_s: must be a finite number"),
    "deadline-inf": (["fleet.deadline_s=inf"], "fleet.deadline_s: must be a finite number >= 0, got inf"),
    "deadline-nan": (["fleet.deadline_s=nan"], "fleet.deadline_s: must be a finite number >= 0, got nan"),
    "learning-rate-inf": (["train.learning_rate=inf"], "train.learning_rate: must be a finite number > 0, got inf"),
    "learning-rate-nan": (["train.learning_rate=nan"], "train.learning_rate: must be a finite number > 0, got nan"),
    "weight-decay-nan": (["train.weight_decay=nan"], "train.weight_decay: must be a finite number >= 0, got nan"),
    "weight-decay-negative": (["train.weight_decay=-0.1"], "train.weight_decay: must be a finite number >= 0"),
    "logit-adjustment-inf": (["train.logit_adjustment=inf"], "train.logit_adjustment: must be a finite number"),
    "cpus-per-client-inf": (["simulation.num_cpus_per_client=inf"], "simulation.num_cpus_per_client: must be a"
                                                                     " finite number > 0, got inf"),
    "cpus-per-client-nan": (["simulation.num_cpus_per_client=nan"], "simulation.num_cpus_per_client: must be a"
                                                                     " finite number > 0, got nan"),
    "hang-inf": (["faults.hang_s=inf"], "faults.hang_s: must be a finite number > 0, got inf"),
    "hang-nan": (["faults.hang_s=nan"], "faults.hang_s: must be a finite number > 0, got nan"),
    "min-replies-above-sample": (["federation.min_replies=5"], "federation.min_replies: must be <= the 4 clients"
                                                               " sampled per round"),
    "min-replies-above-fraction": (["federation.fraction_train=0.5", "federation.min_clients=1",
                                    "federation.min_replies=3"], "federation.min_replies: must be <= the 2 clients"),
    "rank-override-past-last-client": (['lora.rank_overrides={"4" = 8}'], "lora.rank_overrides.4: no such client"),
    "rank-override-negative": (['lora.rank_overrides={"-1" = 8}'], "lora.rank_overrides.-1: no such client"),
    "ratio-override-past-last-client": (['prune.ratio_overrides={"9" = 0.2}'], "prune.ratio_overrides.9: no such"
                                                                               " client"),
    "ratio-override-negative": (['prune.ratio_overrides={"-2" = 0.2}'], "prune.ratio_overrides.-2: no such client"),
    "fault-past-last-client": (['faults.clients={"4" = "nan"}'], "faults.clients.4: no such client"),
    "negative-device-count": (["fleet.devices={jetson-tx2 = -1}"], "fleet.devices.jetson-tx2: a device count must"
                                                                   " be >= 0, got -1"),
    "unknown-backend": (["simulation.backend=dask"], "simulation.backend: must be one of ray; got 'dask'"),
    "ray-address-without-port": (["simulation.ray_address=headnode"], "simulation.ray_address: expected host:port"),
    "ray-connect-timeout-zero": (["simulation.ray_connect_timeout_s=0"], "simulation.ray_connect_timeout_s: must"
                                                                         " be a finite number > 0"),
    "name-absolute": (["name=/tmp/elsewhere"], "name: must be a plain folder name"),
    "name-dotdot": (["name=../elsewhere"], "name: must be a plain folder name"),
    "name-only-dotdot": (['name=".."'], "name: must be a plain folder name"),
    "name-separator": (["name=a/b"], "name: must be a plain folder name"),
    "name-backslash": (['name="a\\\\b"'], "name: must be a plain folder name"),
    "name-empty": (['name=""'], "name: must be a plain folder name"),
}


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code, err, needle):
    assert code == 2, err
    assert err.startswith("fedtune: error: ") and needle in err, err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("sets, needle", list(BAD.values()), ids=list(BAD))
def test_a_bad_value_is_one_line_naming_the_key(sets, needle, capsys, tmp_path):
    args = [x for s in sets for x in ("--set", s)]
    code, err = run(["simulate", "--config", SMOKE, "--out", str(tmp_path / "run"), *args], capsys)
    assert_one_line(code, err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, needle", [BAD["lora-alpha-nan"], BAD["rank-override-past-last-client"]],
                         ids=["lora-alpha-nan", "rank-override"])
@pytest.mark.parametrize("command", ["config", "deploy"])
def test_config_and_deploy_refuse_the_same_values(command, sets, needle, capsys, tmp_path):
    args = [x for s in sets for x in ("--set", s)]
    out = ["--out", str(tmp_path / "run")] if command == "deploy" else []
    code, err = run([command, "--config", SMOKE, *out, *args], capsys)
    assert_one_line(code, err, needle)


def test_a_config_file_that_is_not_utf8_is_named(capsys, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    code, err = run(["simulate", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert_one_line(code, err, f"config file {path}: not UTF-8 text")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize("command", ["config", "deploy"])
@pytest.mark.parametrize("args, needle", [
    (["--strategy", "fedmagic"], "federation.strategy: unknown name 'fedmagic'"),
    (["--strategy", "fedspine", "--policy", "ucb9"], "policy.name: unknown policy 'ucb9'"),
    (["--set", "data.dataset=nope"], "data.dataset: unknown corpus 'nope'"),
    (["--set", "data.partitioner=bogus"], "data.partitioner: unknown partitioner 'bogus'"),
    (["--set", "fleet.devices={jetson-tx3 = 4}"], "fleet.devices: unknown device 'jetson-tx3'"),
], ids=["strategy", "policy", "dataset", "partitioner", "fleet"])
def test_config_and_deploy_run_the_simulate_preflight(command, args, needle, capsys, tmp_path):
    out = ["--out", str(tmp_path / "run")] if command == "deploy" else []
    code, err = run([command, "--config", SMOKE, *out, *args], capsys)
    assert_one_line(code, err, needle)
    assert not (tmp_path / "run").exists()  # deploy started nothing


@pytest.mark.parametrize("command", ["simulate", "config"])
def test_a_target_module_that_matches_nothing_is_named(command, capsys, tmp_path):
    # peft accepts a list as long as one entry matches; every entry must
    args = ["--set", 'lora.target_modules=["query", "nothing_here"]']
    out = ["--out", str(tmp_path / "run")] if command == "simulate" else []
    code, err = run([command, "--config", SMOKE, *out, *args], capsys)
    assert_one_line(code, err, "lora.target_modules: 'nothing_here' matches no module of 'tiny-bert'")


def test_the_config_command_with_an_unknown_strategy_exits_2(capsys):
    code, err = run(["config", "--config", SMOKE, "--strategy", "fedmagic"], capsys)
    assert_one_line(code, err, "federation.strategy: unknown name 'fedmagic'")


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("head.cluster:6379", ("head.cluster", 6379)),
    ("[::1]:6379", ("::1", 6379)),
    ("ray://head:10001", ("head", 10001)),
    ("ray://head", ("head", 10001)),
    ("head", None),
    ("head:port", None),
    ("head:0", None),
    ("head:70000", None),
    ("http://head:8265", None),
])
def test_ray_addresses(address, expected):
    assert ray_host_port(address) == expected
