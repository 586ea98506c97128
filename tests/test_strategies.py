"""Aggregation rules against hand-computed and dense references; a contract test over the registry."""

import pytest
import torch

from fedtune.core.config import ConfigError, config_from_dict
from fedtune.lora.factors import ClientUpdate, GlobalAdapter, dense_delta, pad_factors
from strategies import (
    STRATEGIES,
    FedIT,
    FFALoRA,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    strategy_class,
)
from strategies.flexlora import aggregate_flexlora
from strategies.flora import aggregate_flora
from strategies.hetlora import aggregate_hetlora, product_norm
from tests.conftest import rand_factors

SHAPES = {"layer.0.q": (12, 10), "layer.0.v": (12, 10)}


def exp(ranks=(2, 4), **fed):
    return config_from_dict({"lora": {"ranks": list(ranks)}, "federation": {"num_clients": 4, **fed}})


def update(cid, factors, n, rank=None, head=None):
    rank = rank or next(iter(factors.values()))[0].shape[0]
    return ClientUpdate(client_id=cid, rank=rank, factors=factors, head=head or {}, num_examples=n)


def test_fedit_averages_a_and_b_separately_by_examples(gen):
    f1 = {m: rand_factors(gen, 4) for m in SHAPES}
    f2 = {m: rand_factors(gen, 4) for m in SHAPES}
    strat = FedIT(exp(ranks=(4,)))
    out = strat.aggregate_adapters([update(0, f1, 10), update(1, f2, 30)], GlobalAdapter())
    for m in SHAPES:
        torch.testing.assert_close(out[m][0], 0.25 * f1[m][0] + 0.75 * f2[m][0])
        torch.testing.assert_close(out[m][1], 0.25 * f1[m][1] + 0.75 * f2[m][1])
    # and it is inexact: mean(B) mean(A) != mean(BA)
    exact = 0.25 * dense_delta(*f1["layer.0.q"]) + 0.75 * dense_delta(*f2["layer.0.q"])
    assert not torch.allclose(out["layer.0.q"][1] @ out["layer.0.q"][0], exact)


def test_fedit_refuses_heterogeneous_ranks():
    with pytest.raises(ConfigError, match="federation.strategy.*equal ranks"):
        FedIT(exp(ranks=(2, 4)))


def test_hetlora_zero_pads_and_weights_by_product_norm(gen):
    f1 = {"m": rand_factors(gen, 2)}
    f2 = {"m": rand_factors(gen, 4)}
    out = aggregate_hetlora([update(0, f1, 1), update(1, f2, 1000)], rank=4)
    n1 = torch.linalg.matrix_norm(dense_delta(*f1["m"])).item()
    n2 = torch.linalg.matrix_norm(dense_delta(*f2["m"])).item()
    assert product_norm(*f1["m"]) == pytest.approx(n1)
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    pa1, pb1 = pad_factors(*f1["m"], 4)
    torch.testing.assert_close(out["m"][0], w1 * pa1 + w2 * f2["m"][0])
    torch.testing.assert_close(out["m"][1], w1 * pb1 + w2 * f2["m"][1])


def test_flexlora_equals_truncated_svd_of_dense_weighted_sum(gen):
    ups = [update(i, {"m": rand_factors(gen, r, out_f=20, in_f=16)}, n) for i, (r, n) in enumerate([(2, 10), (4, 30), (8, 60)])]
    dense = sum(u.num_examples / 100 * dense_delta(*u.factors["m"]) for u in ups)
    u_, s, vh = torch.linalg.svd(dense)
    out = aggregate_flexlora(ups, rank=4)
    torch.testing.assert_close(out["m"][1] @ out["m"][0], u_[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-9, rtol=1e-9)


def test_flora_product_equals_weighted_sum_of_client_products(gen):
    ups = [update(i, {"m": rand_factors(gen, r)}, n) for i, (r, n) in enumerate([(2, 10), (4, 30), (8, 60)])]
    out = aggregate_flora(ups)
    dense = sum(u.num_examples / 100 * dense_delta(*u.factors["m"]) for u in ups)
    assert out["m"][0].shape == (14, 10)
    torch.testing.assert_close(out["m"][1] @ out["m"][0], dense)


def test_flora_accumulates_frozen_part_and_restarts_the_adapter(gen):
    strat = FLoRA(exp(ranks=(4,)))
    state = strat.initial_state({"m": (12, 10)}, {})
    ups = [update(i, {"m": rand_factors(gen, 4)}, 10) for i in range(2)]
    s1 = strat.aggregate(ups, state)
    s2 = strat.aggregate(ups, s1)
    once = 0.5 * (dense_delta(*ups[0].factors["m"]) + dense_delta(*ups[1].factors["m"]))
    torch.testing.assert_close(dense_delta(*s2.frozen["m"]), 2 * once)
    assert torch.count_nonzero(s2.adapter["m"][1]) == 0  # fresh B = 0
    small = FLoRA(exp(ranks=(4,)), max_frozen_rank=4)  # re-compression keeps the best rank-4 part
    s3 = small.aggregate(ups, state)
    assert s3.frozen["m"][0].shape[0] == 4


def test_ffalora_keeps_a_and_averages_b_exactly(gen):
    strat = FFALoRA(exp(ranks=(2, 4)))
    state = strat.initial_state({"m": (12, 10)}, {})
    a = state.adapter["m"][0]
    b1, b2 = torch.randn(12, 2, generator=gen), torch.randn(12, 4, generator=gen)
    ups = [update(0, {"m": (a[:2], b1)}, 10), update(1, {"m": (a, b2)}, 30)]
    new = strat.aggregate_adapters(ups, state)
    torch.testing.assert_close(new["m"][0], a)
    exact = 0.25 * b1 @ a[:2] + 0.75 * b2 @ a
    torch.testing.assert_close(new["m"][1] @ new["m"][0], exact)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_maps_identical_updates_to_their_product(name, gen):
    """Contract: identical client updates give a global adapter with the same product."""
    cls = STRATEGIES[name]
    strat = cls(exp(ranks=(4,)))
    state = strat.initial_state(SHAPES, {"classifier.weight": torch.zeros(2, 3)})
    factors = {}
    for m in SHAPES:
        a, b = (t.float() for t in rand_factors(gen, 4))
        if not strat.trains_a:
            a = state.adapter[m][0]
        factors[m] = (a, b)
    head = {"classifier.weight": torch.randn(2, 3, generator=gen)}
    ups = [update(i, factors, n, head=head) for i, n in enumerate((5, 50, 500))]
    new = strat.aggregate(ups, state)
    for m, (a, b) in factors.items():
        torch.testing.assert_close(new.delta(m), b @ a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.head["classifier.weight"], head["classifier.weight"])


def test_registry_resolves_names_modules_and_files(tmp_path):
    assert strategy_class("hetlora") is HetLoRA
    assert strategy_class("strategies.flexlora:FlexLoRA") is FlexLoRA
    plug = tmp_path / "my_rule.py"
    plug.write_text(
        "from strategies import LoraStrategy\n"
        "class Mine(LoraStrategy):\n"
        "    def aggregate_adapters(self, updates, current):\n"
        "        return updates[0].factors\n"
        "class NotAStrategy:\n    pass\n"
    )
    assert strategy_class(f"{plug}:Mine").__name__ == "Mine"
    for spec, pattern in [
        ("nope", "federation.strategy: unknown name 'nope'"),
        (f"{tmp_path}/missing.py:Mine", "plug-in file not found"),
        (f"{plug}:Absent", "has no attribute 'Absent'"),
        (f"{plug}:NotAStrategy", "is not a subclass"),
        ("no_such_module_xyz:Cls", "cannot import module"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            strategy_class(spec)


def test_unknown_strategy_option_names_the_key():
    with pytest.raises(ConfigError, match=r"federation.strategy_args.bogus"):
        HetLoRA(exp(), bogus=1)


def test_mask_aware_aggregation_averages_each_coordinate_over_its_holders(gen):
    """The rules themselves average a pruned row over its holders (no pre-scaling of the updates)."""
    a1, b1 = (t.float() for t in rand_factors(gen, 4))
    a2, b2 = (t.float() for t in rand_factors(gen, 4))
    keep1 = torch.ones(12, dtype=torch.bool)
    keep1[:6] = False  # client 1 pruned rows 0-5 (e.g. a head's q rows)
    b1 = b1.clone()
    b1[:6] = 0.0  # a pruned client's rows are zero (prune-and-tune keeps them so)
    u1 = update(0, {"m": (a1, b1)}, 30)
    u1.keep = {"m": ("rows", keep1)}
    u2 = update(1, {"m": (a2, b2)}, 10)
    out = FedIT(exp(ranks=(4,))).aggregate_adapters([u1, u2], GlobalAdapter())
    # rows 0-5: only client 2 holds them -> its rows, not diluted by client 1's zeros
    torch.testing.assert_close(out["m"][1][:6], b2[:6])
    torch.testing.assert_close(out["m"][1][6:], 0.75 * b1[6:] + 0.25 * b2[6:])
    torch.testing.assert_close(out["m"][0], 0.75 * a1 + 0.25 * a2)  # A is held by both
    # product-based rules see the same holder average, row by row
    flora = aggregate_flora([u1, u2])
    dense = flora["m"][1] @ flora["m"][0]
    torch.testing.assert_close(dense[:6], (b2 @ a2)[:6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense[6:], (0.75 * b1 @ a1 + 0.25 * b2 @ a2)[6:], atol=1e-5, rtol=1e-5)


def test_column_pruning_and_coordinates_nobody_holds(gen):
    from fedtune.lora.factors import holder_weights

    a1, b1 = (t.float() for t in rand_factors(gen, 2))
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    a1 = a1.clone()
    a1[:, 3] = 7.0  # whatever a client leaves in a pruned column does not count
    u1 = update(0, {"m": (a1, b1)}, 5)
    u1.keep = {"m": ("cols", keep)}
    hw = holder_weights([u1], "m", [5.0])
    assert hw.axis == "cols"
    torch.testing.assert_close(hw.coords[0], keep.double())
    out = FedIT(exp(ranks=(2,))).aggregate_adapters([u1], GlobalAdapter())
    torch.testing.assert_close(out["m"][0][:, 3], torch.zeros(2))  # nobody holds column 3
    torch.testing.assert_close(out["m"][0][:, :3], a1[:, :3])
    torch.testing.assert_close(out["m"][1], b1)


def test_the_readme_plugin_example_works(tmp_path, gen):
    """The complete strategy example in the README loads by file path and aggregates."""
    import re

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class PaddedMedian" in b)
    path = tmp_path / "my_strategy.py"
    path.write_text(block)
    cls = strategy_class(f"{path}:PaddedMedian")
    strat = cls(exp(ranks=(2, 4)))
    ups = [update(i, {"m": tuple(t.float() for t in rand_factors(gen, r))}, 10) for i, r in enumerate((2, 4, 4))]
    out = strat.aggregate(ups, strat.initial_state({"m": (12, 10)}, {}))
    padded = [pad_factors(*u.factors["m"], 4) for u in ups]
    torch.testing.assert_close(out.adapter["m"][1], torch.stack([b for _, b in padded]).median(dim=0).values)
