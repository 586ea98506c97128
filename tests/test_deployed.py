"""Completing each device to the target sparsity before deployment (fedtune/deployed.py)."""

import torch

from fedtune.core.config import config_from_dict
from fedtune.pruning.importance import prune_step
from fedtune.pruning.structure import full_masks, model_structure


def _base_and_state():
    from fedtune.lora.factors import GlobalAdapter
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import head_state, lora_shapes

    cfg = config_from_dict({"model": {"name": "tiny-bert", "max_length": 32}, "lora": {"ranks": [4]},
                            "prune": {"ratio": 0.5}})
    base = cached_base_model(cfg.model, cfg.seed)
    gen = torch.Generator().manual_seed(3)
    state = GlobalAdapter(adapter={m: (torch.randn(4, i, generator=gen) * 0.1, torch.randn(o, 4, generator=gen) * 0.1)
                                   for m, (o, i) in lora_shapes(base, cfg).items()}, head=head_state(base))
    return cfg, base, state


def test_completion_reaches_the_target_keeps_earlier_pruning_and_follows_magnitude():
    from fedtune.pruning.completion import complete_masks
    from fedtune.pruning.masks import structural_sparsity as unit_ratio

    cfg, base, state = _base_and_state()
    s = model_structure(base.model)
    gen = torch.Generator().manual_seed(0)
    scores = {ls.layer: {"attn": torch.rand(ls.num_units, generator=gen), "ffn": torch.rand(ls.ffn_dim, generator=gen)}
              for ls in s}
    partial = prune_step(full_masks(s), scores, 0.25)
    done = complete_masks(base.model, s, state, partial, 0.5)
    for ls in s:
        for kind in ("attn", "ffn"):
            n = done[ls.layer][kind].numel()
            assert int((~done[ls.layer][kind]).sum()) == int(0.5 * n)  # the target, per layer and kind
            assert not (done[ls.layer][kind] & ~partial[ls.layer][kind]).any()  # what was pruned stays pruned
    assert unit_ratio(done) > unit_ratio(partial)
    from fedtune.pruning.completion import reaches

    assert reaches(done, 0.5) and not reaches(partial, 0.5) and reaches(partial, 0.25)
    # already at the target: nothing changes
    again = complete_masks(base.model, s, state, done, 0.5)
    assert all(torch.equal(again[k][t], done[k][t]) for k in done for t in done[k])
    # from whole masks, the units with the smallest merged-weight magnitude go first
    whole = complete_masks(base.model, s, state, full_masks(s), 0.5)
    ls = s[0]
    w = base.model.get_submodule(ls.ffn_out).weight.detach() + state.delta(ls.ffn_out)
    col = w.abs().sum(0) / w.abs().sum(0).mean()
    for name in ls.ffn_in:
        wi = base.model.get_submodule(name).weight.detach() + state.delta(name)
        col = col + wi.abs().sum(1) / wi.abs().sum(1).mean()
    pruned = (~whole[ls.layer]["ffn"]).nonzero().flatten()
    kept = whole[ls.layer]["ffn"].nonzero().flatten()
    assert col[pruned].max() <= col[kept].min() + 1e-6


def test_pick_clients_takes_one_of_each_class_first():
    from fedtune.pruning.completion import pick_clients

    classes = {0: "tx2", 1: "tx2", 2: "nx", 3: "nx", 4: "agx"}
    assert pick_clients([4, 3, 2, 1, 0], classes, 4) == [4, 2, 0, 3]
    assert pick_clients([0, 1], classes, 5) == [0, 1]
    assert pick_clients([0, 1], classes, 0) == []


def test_deployment_report_measures_the_deployed_models():
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.pruning.completion import deployment_report
    from fedtune.training.local import evaluate_global

    cfg, base, state = _base_and_state()
    s = model_structure(base.model)
    fed = cached_federated_data(cfg.data, "classification", 2, 0, 2)
    data = tokenize(fed.eval, base.tokenizer, "classification", 32)
    masks = {0: full_masks(s), 1: prune_step(full_masks(s), {ls.layer: {"attn": torch.arange(ls.num_units).float(),
                                                                         "ffn": torch.arange(ls.ffn_dim).float()}
                                                              for ls in s}, 0.5)}
    lines: list[str] = []
    out = deployment_report(base, cfg, state, s, masks, 0.5, data, payload_for=lambda cid: state,
                            classes={0: "a", 1: "b"},
                            evaluate=lambda st, m: evaluate_global(base, st, data, cfg, masks=m), say=lines.append)
    assert out["trained_sparsity"] < out["deployed_sparsity"] == 0.5
    assert [r["client_id"] for r in out["evaluated"]] == [0, 1]
    assert all(r["deployed_sparsity"] == 0.5 for r in out["evaluated"])
    assert 0.0 <= out["eval_accuracy"] <= 1.0
    assert out["params"] < out["dense_params"] and out["size_mb"] > 0
    assert out["latency_ms"] > 0 and out["dense_latency_ms"] > 0
    assert any("completed to sparsity 0.5" in line for line in lines)


def test_calibrated_completion_weighs_weights_by_the_devices_activations():
    from fedtune.data.batching import collate, tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.pruning.completion import complete_masks

    cfg, base, state = _base_and_state()
    s = model_structure(base.model)
    fed = cached_federated_data(cfg.data, "classification", 2, 0, 2)
    data = tokenize(fed.partition(0), base.tokenizer, "classification", 32)
    batch = {k: v for k, v in collate(data, list(range(16)), base.tokenizer.pad_token_id, "classification").items()
             if k != "labels"}
    masks = complete_masks(base.model, s, state, full_masks(s), 0.5, calibration=[batch])
    # the expected FFN order of layer 0: |W + BA| * ||x|| summed per channel (normalised per module)
    ls = s[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [base.model.get_submodule(p).register_forward_pre_hook(
        lambda _m, a, p=p: seen.__setitem__(p, a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0).sqrt()))
        for p in (*ls.ffn_in, ls.ffn_out)]
    with torch.no_grad():
        base.model(**batch)
    for h in hooks:
        h.remove()

    def norm(v):
        return v / v.mean()

    wo = (base.model.get_submodule(ls.ffn_out).weight.detach() + state.delta(ls.ffn_out)).abs() * seen[ls.ffn_out]
    score = norm(wo.sum(0))
    for name in ls.ffn_in:
        wi = (base.model.get_submodule(name).weight.detach() + state.delta(name)).abs() * seen[name]
        score = score + norm(wi.sum(1))
    pruned = (~masks[ls.layer]["ffn"]).nonzero().flatten()
    kept = masks[ls.layer]["ffn"].nonzero().flatten()
    assert score[pruned].max() <= score[kept].min() + 1e-5
    assert not torch.equal(masks[ls.layer]["ffn"], complete_masks(base.model, s, state, full_masks(s), 0.5)[0]["ffn"])


def test_client_masks_survive_a_checkpoint():
    import json

    from strategies import FlexLoRA

    cfg, base, _ = _base_and_state()
    s = model_structure(base.model)
    strat = FlexLoRA(cfg)
    strat.client_masks = {3: prune_step(full_masks(s), {ls.layer: {"attn": torch.arange(ls.num_units).float(),
                                                                    "ffn": torch.arange(ls.ffn_dim).float()}
                                                         for ls in s}, 0.5)}
    other = FlexLoRA(cfg)
    other.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    assert set(other.client_masks) == {3}
    for layer, m in strat.client_masks[3].items():
        for kind, t in m.items():
            assert torch.equal(other.client_masks[3][layer][kind], t)
