"""Rank-stabilised LoRA scaling (``lora.rslora``, tracker issue 13 item 10) on a tiny random BERT.

peft's scale is ``alpha / r`` by default and ``alpha / sqrt(r)`` with ``use_rslora``; fedtune folds
it into B when reading an adapter and divides it out when loading one, so factors round-trip and
the exported PEFT adapter (scale 1) reproduces the same deltas under either setting.
"""

import json
import math
import sys
import tomllib

import pytest
import torch

from fedtune.core.config import config_from_dict
from fedtune.lora.attach import (
    attach_lora,
    detach_lora,
    load_factors,
    lora_layers,
    read_factors,
)
from fedtune.lora.factors import GlobalAdapter
from fedtune.models.loading import cached_base_model
from fedtune.training.local import head_state, lora_shapes
from tests.conftest import ROOT

ALPHA = 8.0


def experiment(rslora):
    return config_from_dict({
        "model": {"name": "tiny-bert", "task": "classification", "max_length": 32},
        "lora": {"ranks": [2, 4], "alpha": ALPHA, "rslora": rslora},
        "federation": {"num_clients": 2},
    })


def random_factors(shapes, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen))
            for m, (o, i) in shapes.items()}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rank", [2, 4])
def test_attach_scale_and_exact_round_trip(rslora, rank):
    cfg = experiment(rslora)
    base = cached_base_model(cfg.model, cfg.seed)
    factors = random_factors(lora_shapes(base, cfg), rank, seed=rank)
    peft_model = attach_lora(base, rank, cfg.lora)
    try:
        expected = ALPHA / math.sqrt(rank) if rslora else ALPHA / rank
        for layer in lora_layers(peft_model).values():
            assert layer.scaling["default"] == pytest.approx(expected, rel=1e-12)
        load_factors(peft_model, factors)
        layers = lora_layers(peft_model)
        back = read_factors(peft_model)
        for m, (a, b) in factors.items():
            torch.testing.assert_close(back[m][0], a, atol=0, rtol=0)  # A is copied as is
            torch.testing.assert_close(back[m][1], b, atol=1e-6, rtol=1e-6)  # B: * (1/s) * s in float32
            # what the model adds to the weight is fedtune's B @ A, whatever the scale
            torch.testing.assert_close(layers[m].get_delta_weight("default"), b @ a, atol=1e-5, rtol=1e-5)
    finally:
        detach_lora(peft_model, base)


def test_rslora_steps_do_not_shrink_with_rank():
    """rsLoRA's scale ratio between ranks 4 and 16 is 2, not 4 (alpha / r)."""
    plain, rs = experiment(False).lora, experiment(True).lora
    assert plain.rslora is False and rs.rslora is True  # the old behaviour stays the default
    cfg = experiment(True)
    base = cached_base_model(cfg.model, cfg.seed)
    scales = {}
    for rank in (4, 16):
        peft_model = attach_lora(base, rank, rs)
        try:
            scales[rank] = next(iter(lora_layers(peft_model).values())).scaling["default"]
        finally:
            detach_lora(peft_model, base)
    assert scales[4] / scales[16] == pytest.approx(2.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_exported_adapter_has_scale_one_and_the_same_deltas(rslora, tmp_path):
    from peft import PeftModel

    from fedtune.lora.export import combined_factors, save_peft_adapter
    from fedtune.models.loading import fresh_float_base

    cfg = experiment(rslora)
    base = cached_base_model(cfg.model, cfg.seed)
    shapes = lora_shapes(base, cfg)
    state = GlobalAdapter(adapter=random_factors(shapes, 4, seed=1), frozen=random_factors(shapes, 2, seed=2),
                          head=head_state(base))
    path = save_peft_adapter(state, cfg, tmp_path / "adapter")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["r"] == 6 and saved["lora_alpha"] == 6 and saved["use_rslora"] is False
    fresh = fresh_float_base(cfg)
    model = PeftModel.from_pretrained(fresh.model, str(path))
    layers = lora_layers(model)
    for m, (a, b) in combined_factors(state).items():
        assert layers[m].scaling["default"] == pytest.approx(1.0)
        torch.testing.assert_close(layers[m].get_delta_weight("default"), b @ a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layers[m].get_delta_weight("default"), state.delta(m), atol=1e-5, rtol=1e-5)


def test_comparison_settings_use_rslora_for_every_method():
    sys.path.insert(0, str(ROOT / "simulations"))
    import reproduce

    paths = sorted((ROOT / "simulations" / "fedspine").glob("**/*.toml"))
    assert len(paths) >= 4
    for path in paths:
        assert tomllib.loads(path.read_text())["experiment"]["lora"]["rslora"] is True, path.name
        s = reproduce.load_setting(path)
        for m in s["methods"]:
            for name in (list(reproduce.grid(s)) if m == "best-static" else [m]):
                cfg = config_from_dict(reproduce.method_config(s, name, s["seeds"][0], reproduce.static_of(s, name)))
                assert cfg.lora.rslora is True, (path.name, name)
