"""Structured pruning: structure groups (GQA-aware), masks, schedule, slicing equals masking."""

import copy

import pytest
import torch

from fedtune.core.config import ConfigError, config_from_dict
from fedtune.core.protocol import PruneSpec
from fedtune.models.loading import load_base_model
from fedtune.pruning.importance import cubic_ratio, lora_weight_gradient, prune_step
from fedtune.pruning.slicing import slice_model
from fedtune.pruning.structure import apply_masks, full_masks, model_structure, sparsity
from tests.conftest import masked_logits


def tiny(name):
    cfg = config_from_dict({"model": {"name": name, "task": "classification" if name == "tiny-bert" else "causal-lm",
                                      "max_length": 32}})
    return load_base_model(cfg.model, seed=0), cfg


def test_structure_groups_for_bert_and_gqa_llama():
    bert, _ = tiny("tiny-bert")
    s = model_structure(bert.model)
    assert len(s) == 2 and s[0].num_units == 4 and s[0].ffn_dim == 64
    assert s[0].attn_rows == {f"bert.encoder.layer.0.attention.self.{n}": 8 for n in ("query", "key", "value")}
    llama, _ = tiny("tiny-llama")
    s = model_structure(llama.model)
    # 4 query heads over 2 KV heads: a unit is a KV group = 2 query heads (16 rows) + 1 k/v head (8 rows)
    assert s[0].num_units == 2
    assert s[0].attn_rows == {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.k_proj": 8,
                              "model.layers.0.self_attn.v_proj": 8}
    assert s[0].ffn_in == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


def test_masks_only_grow_and_follow_scores():
    bert, _ = tiny("tiny-bert")
    s = model_structure(bert.model)
    masks = full_masks(s)
    scores = {ls.layer: {"attn": torch.tensor([4.0, 1.0, 3.0, 2.0]), "ffn": torch.arange(64.0)} for ls in s}
    m1 = prune_step(masks, scores, 0.5)
    assert m1[0]["attn"].tolist() == [True, False, True, False]
    assert int((~m1[0]["ffn"]).sum()) == 32 and not m1[0]["ffn"][:32].any()
    # a lower ratio or reversed scores never un-prune
    rev = {ls.layer: {"attn": -scores[ls.layer]["attn"], "ffn": -scores[ls.layer]["ffn"]} for ls in s}
    m2 = prune_step(m1, rev, 0.25)
    assert torch.equal(m2[0]["attn"], m1[0]["attn"])
    m3 = prune_step(m1, rev, 0.75)
    assert not (m3[0]["attn"] & ~m1[0]["attn"]).any() and int(m3[0]["attn"].sum()) == 1
    assert prune_step(masks, scores, 0.99)[0]["attn"].sum() == 1  # a layer always keeps one unit
    assert 0.7 < sparsity(s, m3, 32) < 0.8


def test_cubic_schedule():
    assert cubic_ratio(0.5, 0.0, 0, 4) == 0.0
    assert cubic_ratio(0.5, 0.0, 4, 4) == 0.5
    assert cubic_ratio(0.5, 0.0, 1, 4) == pytest.approx(0.5 - 0.5 * 0.75 ** 3)
    assert cubic_ratio(0.5, 0.2, 2, 4) == pytest.approx(0.5 - 0.3 * 0.125)


def test_lora_weight_gradient_formula():
    a = torch.tensor([[1.0, 2.0]])  # (r=1, in=2)
    b = torch.tensor([[3.0], [4.0]])  # (out=2, r=1)
    ga = torch.tensor([[0.5, -1.0]])
    gb = torch.tensor([[2.0], [1.0]])
    g = lora_weight_gradient(a, b, ga, gb, scale=2.0)
    expected = 2.0 * (gb @ a + b @ ga - gb @ ga)
    torch.testing.assert_close(g, expected)
    assert g[0, 0].item() == pytest.approx(2.0 * (2 * 1 + 3 * 0.5 - 2 * 0.5))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_sliced_model_equals_masked_model(name):
    base, _ = tiny(name)
    model = base.model.eval()
    s = model_structure(model)
    gen = torch.Generator().manual_seed(0)
    scores = {ls.layer: {"attn": torch.rand(ls.num_units, generator=gen), "ffn": torch.rand(ls.ffn_dim, generator=gen)}
              for ls in s}
    masks = prune_step(full_masks(s), scores, 0.5)
    ids = torch.randint(5, 1000, (2, 12), generator=gen)
    handles = apply_masks(model, s, masks)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    assert not torch.allclose(masked, unmasked, atol=1e-4)
    sliced = slice_model(copy.deepcopy(model), s, masks)
    with torch.no_grad():
        out = sliced(input_ids=ids).logits
    assert (out - masked).abs().max().item() < 1e-4
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in sliced.parameters())
    assert n_after < n_before
    if name == "tiny-llama":  # GQA: one of two KV groups left per layer -> 2 query heads, 1 KV head
        attn = sliced.model.layers[0].self_attn
        assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16


def test_prune_and_tune_reaches_the_target_and_pruned_units_get_no_update():
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import head_state, lora_shapes, train_local
    from strategies import HetLoRA

    cfg = config_from_dict({
        "model": {"name": "tiny-bert", "max_length": 32},
        "lora": {"ranks": [4], "target_modules": ["query", "key", "value", "dense"]},
        "data": {"partitioner": "iid", "eval_size": 64, "max_examples": 400},
        "train": {"local_steps": 12, "batch_size": 8},
        "federation": {"num_clients": 2},
    })
    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, 2, cfg.seed, 2)
    data = tokenize(fed.partition(0), base.tokenizer, "classification", 32)
    strat = HetLoRA(cfg)
    payload = strat.client_payload(strat.initial_state(lora_shapes(base, cfg), head_state(base)), 0, 4)
    res = train_local(base, payload, 4, data, cfg, seed=0, prune=PruneSpec(target=0.5, interval=4))
    assert res.masks is not None and 0.45 < res.sparsity < 0.55
    s = model_structure(base.model)
    for ls in s:
        dropped = (~res.masks[ls.layer]["attn"]).nonzero().flatten().tolist()
        assert len(dropped) == 2
        for h in dropped:
            for m in ls.attn_in:
                assert torch.count_nonzero(res.factors[m][1][h * 8:(h + 1) * 8]) == 0
            assert torch.count_nonzero(res.factors[ls.attn_out][0][:, h * 8:(h + 1) * 8]) == 0
        ffn_dropped = ~res.masks[ls.layer]["ffn"]
        assert torch.count_nonzero(res.factors[ls.ffn_in[0]][1][ffn_dropped]) == 0
        assert torch.count_nonzero(res.factors[ls.ffn_out][0][:, ffn_dropped]) == 0
    # a second round continues from the masks: they only grow
    res2 = train_local(base, payload, 4, data, cfg, seed=1, prune=PruneSpec(target=0.75, interval=4),
                       masks=res.masks, scores=res.scores)
    for layer, m in res.masks.items():
        for kind in m:
            assert not (res2.masks[layer][kind] & ~m[kind]).any()
    assert res2.sparsity > res.sparsity


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_exported_client_model_equals_the_masked_model(name, tmp_path):
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.pruning.export import export_pruned_model, load_pruned_model
    from fedtune.training.local import head_state, lora_shapes

    task = "classification" if name == "tiny-bert" else "causal-lm"
    cfg = config_from_dict({"model": {"name": name, "task": task, "max_length": 32}, "lora": {"ranks": [4]},
                            "prune": {"ratio": 0.5}})
    base = cached_base_model(cfg.model, cfg.seed)
    gen = torch.Generator().manual_seed(1)
    shapes = lora_shapes(base, cfg)
    state = GlobalAdapter(adapter={m: (torch.randn(4, i, generator=gen) * 0.2, torch.randn(o, 4, generator=gen) * 0.2)
                                   for m, (o, i) in shapes.items()},
                          head={k: v + 0.1 for k, v in head_state(base).items()})
    s = model_structure(base.model)
    masks = prune_step(full_masks(s), {ls.layer: {"attn": torch.rand(ls.num_units, generator=gen),
                                                  "ffn": torch.rand(ls.ffn_dim, generator=gen)} for ls in s}, 0.5)
    ids = torch.randint(5, 1000, (2, 10), generator=gen)
    expected = masked_logits(base, state, 4, cfg, masks, ids)
    info = export_pruned_model(state, masks, cfg, tmp_path / "model")
    model = load_pruned_model(tmp_path / "model")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert info["params_after"] < info["params_before"]
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]


def test_skipped_layers_are_never_pruned():
    bert, _ = tiny("tiny-bert")
    s = model_structure(bert.model)
    scores = {ls.layer: {"attn": torch.arange(4.0), "ffn": torch.arange(64.0)} for ls in s}
    m = prune_step(full_masks(s), scores, 0.5, skip_layers={0})
    assert m[0]["attn"].all() and m[0]["ffn"].all()
    assert int((~m[1]["attn"]).sum()) == 2


def test_pruning_events_leave_the_recovery_steps_free():
    from fedtune.pruning.prune_and_tune import event_steps

    assert event_steps(10, 5) == [5, 10]
    assert event_steps(10, 2, recovery_steps=4) == [2, 4, 6]
    assert event_steps(10, 20) == [10]  # fewer steps than the interval: one event at the end
    assert event_steps(10, 20, recovery_steps=3) == [7]
    assert event_steps(3, 1, recovery_steps=5) == [1]
    with pytest.raises(ConfigError, match="prune.recovery_steps"):
        config_from_dict({"prune": {"recovery_steps": -1}})


def test_importance_is_l2_normalised_per_module():
    """LoRAPrune normalises each module's group scores by their L2 norm before summing a group's modules."""
    from fedtune.pruning.importance import normalise, unit_scores

    torch.testing.assert_close(normalise(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    assert torch.equal(normalise(torch.zeros(3)), torch.zeros(3))
    bert, _ = tiny("tiny-bert")
    ls = model_structure(bert.model)[0]
    gen = torch.Generator().manual_seed(0)
    w_in = torch.rand(ls.ffn_dim, 32, generator=gen)  # (out=ffn, in=hidden): one row per channel
    w_out = torch.rand(32, ls.ffn_dim, generator=gen) * 7.0  # (out=hidden, in=ffn): one column per channel
    one = unit_scores([ls], {ls.ffn_in[0]: w_in})[ls.layer]["ffn"]
    assert float(one.norm()) == pytest.approx(1.0, abs=1e-5)
    both = unit_scores([ls], {ls.ffn_in[0]: w_in, ls.ffn_out: w_out})[ls.layer]["ffn"]
    rows, cols = w_in.sum(1), w_out.sum(0)
    torch.testing.assert_close(both, rows / rows.norm() + cols / cols.norm())


def test_importance_ema_starts_from_zero(monkeypatch):
    """LoRAPrune's moving average starts from zero: the first observation gets weight (1 - ema), not 1."""
    import fedtune.pruning.prune_and_tune as pt

    bert, _ = tiny("tiny-bert")
    s = model_structure(bert.model)
    x1 = {ls.layer: {"attn": torch.tensor([4.0, 0.0, 2.0, 2.0]), "ffn": torch.ones(ls.ffn_dim)} for ls in s}
    x2 = {ls.layer: {"attn": torch.tensor([0.0, 3.0, 2.0, 2.0]), "ffn": torch.ones(ls.ffn_dim)} for ls in s}
    seq = iter([x1, x2])
    monkeypatch.setattr(pt, "unit_scores", lambda structure, weights: next(seq))
    pruner = pt.PruneAndTune(bert.model, {}, s, PruneSpec(target=0.25, interval=2, ema=0.5), total_steps=2)
    try:
        pruner.observe()
        torch.testing.assert_close(pruner.scores[0]["attn"], torch.tensor([2.0, 0.0, 1.0, 1.0]))
        pruner.observe()
        torch.testing.assert_close(pruner.scores[0]["attn"], torch.tensor([1.0, 1.5, 1.5, 1.5]))
        pruner.after_step(2)  # from zero, the newer observation wins: unit 0 is the least important
        assert pruner.masks[0]["attn"].tolist() == [False, True, True, True]
    finally:
        pruner.close()


def test_edge_layers_are_skipped_by_default():
    """prune.skip_edge_layers (default on): the first and last layers are never pruned, as in LoRAPrune,
    unless the model has 2 or fewer layers (skipping both edges would leave nothing to prune)."""
    from fedtune.core.config import PruneConfig

    assert PruneSpec.from_config(PruneConfig(), 0.5, 6).skip_layers == (0, 5)
    assert PruneSpec.from_config(PruneConfig(skip_layers=[2, 5]), 0.5, 6).skip_layers == (0, 2, 5)
    assert PruneSpec.from_config(PruneConfig(), 0.5, 3).skip_layers == (0, 2)
    assert PruneSpec.from_config(PruneConfig(), 0.5, 2).skip_layers == ()  # tiny models: all layers prunable
    assert PruneSpec.from_config(PruneConfig(), 0.5, 1).skip_layers == ()
    assert PruneSpec.from_config(PruneConfig(), 0.5, 0).skip_layers == ()
    assert PruneSpec.from_config(PruneConfig(skip_layers=[1]), 0.5, 2).skip_layers == (1,)
    off = config_from_dict({"prune": {"skip_edge_layers": False, "skip_layers": [3]}}).prune
    assert PruneSpec.from_config(off, 0.5, 6).skip_layers == (3,)
    assert config_from_dict({}).prune.skip_edge_layers is True


def test_skipped_layers_do_not_count_toward_the_starting_ratio():
    """A round continuing from masks that already reach the target on every prunable layer has no
    pruning event, even though the skipped (whole) layers bring the all-layer average down."""
    from fedtune.pruning.prune_and_tune import PruneAndTune

    bert, _ = tiny("tiny-bert")
    s = model_structure(bert.model)
    scores = {ls.layer: {"attn": torch.arange(4.0), "ffn": torch.arange(64.0)} for ls in s}
    masks = prune_step(full_masks(s), scores, 0.5, skip_layers={0})
    pruner = PruneAndTune(bert.model, {}, s, PruneSpec(target=0.5, interval=2, skip_layers=(0,)), total_steps=4,
                          masks=masks, scores=scores)
    try:
        assert pruner.start == pytest.approx(0.5) and pruner.num_events == 0
    finally:
        pruner.close()
