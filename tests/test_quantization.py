"""Quantized bases on the CPU (bitsandbytes' CPU backend): config, memory-driven widths,
training that keeps its gradients (the AVX512-BF16 repacking trap), pruning and export."""

import math

import pytest
import torch

from fedtune.core.config import ConfigError, config_from_dict, load_config
from fedtune.pruning.importance import prune_step
from fedtune.pruning.structure import full_masks, model_structure
from tests.conftest import masked_logits

FLEET = {"federation": {"num_clients": 3}, "fleet": {"devices": {"jetson-tx2": 1, "jetson-xavier-nx": 1,
                                                                 "jetson-agx-xavier": 1}}}


@pytest.mark.parametrize("table, needle", [
    ({"model": {"quantization": "auto"}}, "model.quantization: 'auto' picks a width per device and needs fleet"),
    ({**FLEET, "model": {"quantization_by_device": {"toaster": "nf4"}}},
     "model.quantization_by_device.toaster: not a device class"),
    ({**FLEET, "model": {"quantization_by_device": {"jetson-tx2": "fp4"}}},
     "model.quantization_by_device.jetson-tx2: must be one of"),
    ({**FLEET, "simulation": {"gpu_fraction_by_device": {"jetson-tx2": 1.5}}},
     "simulation.gpu_fraction_by_device.jetson-tx2: must be in (0, 1]"),
    ({**FLEET, "simulation": {"gpu_fraction_by_device": {"phone-midrange": 0.1}}},
     "simulation.gpu_fraction_by_device.phone-midrange: not a device class"),
    ({"model": {"compute_dtype": "float8"}}, "model.compute_dtype"),
])
def test_quantization_and_gpu_share_keys_are_checked(table, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(table)
    assert needle in str(err.value)


def test_gpu_shares_without_a_gpu_fail_before_ray_starts():
    from fedtune.engine.simulation import preflight

    cfg = config_from_dict({**FLEET, "model": {"name": "tiny-bert", "max_length": 32},
                            "data": {"partitioner": "iid", "max_examples": 200, "eval_size": 32},
                            "simulation": {"gpu_fraction_by_device": {"jetson-tx2": 0.1}}})
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="simulation.gpu_fraction_by_device: asks for GPUs, but no CUDA GPU"):
        preflight(cfg)


def test_auto_quantization_is_the_widest_width_that_fits_each_device(tmp_path):
    """FedPipe's memory-driven bit widths: a device gets fp32 if it fits, else int8, else NF4."""
    from fedtune.fleet.clock import FleetSimulator
    from fedtune.models.loading import cached_base_model
    from strategies import HetLoRA

    probe = load_config(None, ['model.name="tiny-bert"', "federation.num_clients=1", "federation.min_clients=1",
                         "fleet.devices.jetson-tx2=1"])
    base = cached_base_model(probe.model, probe.seed)
    fleet = FleetSimulator.from_config(probe, base.model, model_structure(base.model))
    need = {w: fleet.peak_gb(fleet.shape(None), 8, probe.train.batch_size, probe.model.max_length, w)
            for w in ("none", "int8", "nf4")}
    assert need["nf4"] < need["int8"] < need["none"]
    profiles = tmp_path / "devices.toml"
    memory = {"big": need["none"] * 1.01, "mid": (need["none"] + need["int8"]) / 2,
              "small": (need["int8"] + need["nf4"]) / 2, "tiny": need["nf4"] / 2}
    profiles.write_text("".join(
        f'[devices.{name}]\ntflops = {{ fp32 = 1.0 }}\nmemory_gb = {gb}\nuplink_mbps = 10.0\ndownlink_mbps = 10.0\n'
        f'availability = 1.0\n\n' for name, gb in memory.items()))
    cfg = config_from_dict({"model": {"name": "tiny-bert", "quantization": "auto",
                                      "quantization_by_device": {"tiny": "int8"}},
                            "lora": {"ranks": [8]}, "federation": {"num_clients": 4},
                            "fleet": {"devices": {"big": 1, "mid": 1, "small": 1, "tiny": 1}, "profiles": str(profiles)},
                            "simulation": {"gpu_fraction_by_device": {"small": 0.25}}})
    structure = model_structure(base.model)
    strat = HetLoRA(cfg, structure=structure, fleet=FleetSimulator.from_config(cfg, base.model, structure))
    assert [strat.quantization_for(c, 8) for c in range(4)] == ["none", "int8", "nf4", "int8"]
    assert strat.fleet.precheck(3, 8, None).startswith("out of memory on tiny")  # int8 forced: does not fit
    assert [strat.gpu_fraction_for(c) for c in range(4)] == [0.0, 0.0, 0.25, 0.0]


def _nf4(**extra):
    return config_from_dict({"model": {"quantization": extra.pop("q", "nf4"), "max_length": 32},
                             "lora": {"ranks": [4]}, "train": {"batch_size": 4, "learning_rate": 5e-3}, **extra})


@pytest.mark.parametrize("q", ["nf4", "int8"])
def test_quantized_training_keeps_its_gradients_after_an_evaluation(q):
    """bitsandbytes repacks 4-bit weights for inference after a no-grad forward on AVX512-BF16
    CPUs, after which LoRA gradients vanish (STACK.md). Train, evaluate, train again: the second
    round must still move the adapter and the loss."""
    from fedtune.data.batching import Tokenized
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import evaluate_global, head_state, train_local

    cfg = _nf4(q=q)
    base = cached_base_model(cfg.model, cfg.seed)
    kind = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[q]
    assert any(type(m).__name__ == kind for m in base.model.modules())
    gen = torch.Generator().manual_seed(0)
    data = Tokenized(input_ids=[torch.randint(1000, 5000, (12,), generator=gen).tolist() for _ in range(16)],
                     labels=[i % 2 for i in range(16)])
    state = GlobalAdapter(adapter={}, head=head_state(base))
    first = train_local(base, state, 4, data, cfg, seed=1, steps=3)
    after_first = GlobalAdapter(adapter=first.factors, head=first.head)
    evaluate_global(base, after_first, data, cfg)  # the no-grad forward that triggers the repacking
    second = train_local(base, after_first, 4, data, cfg, seed=2, steps=3)
    moved = max((second.factors[m][0] - first.factors[m][0]).abs().max().item() for m in first.factors)
    assert moved > 1e-6, "adapter A did not move in the second round: LoRA gradients were lost"
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in second.factors.values())


def test_lora_guided_pruning_and_export_over_an_nf4_base(tmp_path):
    """Importance from dequantized NF4 weights; the export dequantizes, merges, slices and saves a
    float model whose logits match the masked quantized model's."""
    from fedtune.core.protocol import PruneSpec
    from fedtune.data.batching import Tokenized
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.pruning.export import export_pruned_model, load_pruned_model
    from fedtune.training.local import head_state, train_local

    cfg = _nf4(prune={"ratio": 0.5, "interval": 2})
    base = cached_base_model(cfg.model, cfg.seed)
    gen = torch.Generator().manual_seed(0)
    data = Tokenized(input_ids=[torch.randint(1000, 5000, (12,), generator=gen).tolist() for _ in range(16)],
                     labels=[i % 2 for i in range(16)])
    result = train_local(base, GlobalAdapter(adapter={}, head=head_state(base)), 4, data, cfg, seed=1, steps=4,
                         prune=PruneSpec(target=0.5, interval=2))
    assert result.masks is not None and result.sparsity > 0.2
    s = model_structure(base.model)
    state = GlobalAdapter(adapter=result.factors, head=result.head)
    ids = torch.tensor([data.input_ids[0]])
    expected = masked_logits(base, state, 4, cfg, result.masks, ids)
    info = export_pruned_model(state, result.masks, cfg, tmp_path / "model")
    model = load_pruned_model(tmp_path / "model")
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-3, (got, expected)
    assert info["params_after"] < info["params_before"]
    assert prune_step(full_masks(s), {ls.layer: {"attn": torch.ones(ls.num_units), "ffn": torch.ones(ls.ffn_dim)}
                                      for ls in s}, 0.0) is not None


@pytest.mark.parametrize("q", ["nf4", "int8"])
def test_a_quantized_causal_lm_trains_and_prunes(q):
    """A causal LM's output projection is tied to its embeddings: it stays a float linear (as in
    QLoRA), so a quantized Llama-style base trains, prunes and trains again on its masks."""
    from fedtune.core.protocol import PruneSpec
    from fedtune.data.batching import Tokenized
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import head_state, train_local

    cfg = config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm", "max_length": 32, "quantization": q},
                            "lora": {"ranks": [4]}, "train": {"batch_size": 4}, "prune": {"ratio": 0.5, "interval": 2}})
    base = cached_base_model(cfg.model, cfg.seed)
    assert type(base.model.lm_head).__name__ == "Linear"
    gen = torch.Generator().manual_seed(0)
    data = Tokenized(input_ids=[torch.randint(1000, 5000, (12,), generator=gen).tolist() for _ in range(8)], labels=None)
    state = GlobalAdapter(adapter={}, head=head_state(base))
    first = train_local(base, state, 4, data, cfg, seed=1, steps=4, prune=PruneSpec(target=0.5, interval=2))
    again = train_local(base, GlobalAdapter(adapter=first.factors, head=first.head), 4, data, cfg, seed=2, steps=2,
                        prune=PruneSpec(target=0.5, interval=2), masks=first.masks, scores=first.scores)
    assert first.masks is not None and first.sparsity > 0.2 and math.isfinite(again.train_loss)
