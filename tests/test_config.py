"""Config parsing: every bad key or value is an error that names it."""

import pytest

from fedtune.core.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    config_to_toml,
    load_config,
    parse_overrides,
)


def test_defaults_are_the_default_experiment():
    cfg = ExperimentConfig()
    assert cfg.model.name == "minilm" and cfg.data.dataset == "rotten-tomatoes"
    assert cfg.data.partitioner == "dirichlet" and cfg.federation.num_clients >= 20
    assert len(set(cfg.lora.ranks)) >= 3


def test_default_toml_matches_builtin_defaults(tmp_path):
    import dataclasses

    from tests.conftest import ROOT

    cfg = load_config(ROOT / "simulations" / "default.toml")
    # the file spells out the Dirichlet defaults that make_partitioner applies
    assert cfg.data.partitioner_args == {"alpha": 1.0, "min_partition_size": 10}
    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, partitioner_args={}))
    assert plain == ExperimentConfig()


def test_roundtrip_through_toml(tmp_path):
    cfg = config_from_dict({"lora": {"ranks": [2, 8], "rank_overrides": {"3": 16}}}, ["federation.num_rounds=3"])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg
    assert cfg.lora.rank_for(0) == 2 and cfg.lora.rank_for(1) == 8 and cfg.lora.rank_for(3) == 16


@pytest.mark.parametrize(
    "table, overrides, pattern",
    [
        ({"federation": {"num_roundz": 3}}, [], r"unknown config key 'federation.num_roundz'"),
        ({"bogus": 1}, [], r"unknown config key 'bogus'"),
        ({}, ["federation.num_rounds=three"], r"federation.num_rounds: expected int, got str"),
        ({}, ["train.learning_rate=true"], r"train.learning_rate: expected a number"),
        ({}, ["lora.ranks=[4, 0]"], r"lora.ranks"),
        ({}, ["model.task=translation"], r"model.task: must be one of"),
        ({}, ["model=3"], r"model: expected a table"),
        ({}, ["federation.fraction_train=0"], r"federation.fraction_train"),
        ({}, ["lora.rank_overrides={a = 2}"], r"lora.rank_overrides: key 'a'"),
    ],
)
def test_bad_keys_and_values_name_the_key(table, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(table, overrides)


def test_override_values_are_toml_or_bare_strings():
    assert parse_overrides(["a=3", "b=hetlora", 'c="x:y"', "d=[1, 2]", "e=0.5"]) == [
        ("a", 3), ("b", "hetlora"), ("c", "x:y"), ("d", [1, 2]), ("e", 0.5)]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_sample_size_follows_fraction_or_count():
    fed = config_from_dict({}, ["federation.fraction_train=0.3"]).federation
    assert fed.sample_size(20) == 6
    fed = config_from_dict({}, ["federation.clients_per_round=5"]).federation
    assert fed.sample_size(20) == 5
    assert config_from_dict({}, ["federation.fraction_train=0.01"]).federation.sample_size(20) == 2
