"""The LoRA algebra against dense references."""

import torch

from fedtune.lora.factors import (
    dense_delta,
    init_factors,
    is_finite_adapter,
    lowrank_svd,
    pad_factors,
    stack_factors,
    truncate_factors,
)
from tests.conftest import rand_factors


def test_pad_keeps_product_and_truncate_keeps_leading_components(gen):
    a, b = rand_factors(gen, 3)
    pa, pb = pad_factors(a, b, 7)
    assert pa.shape == (7, 10) and pb.shape == (12, 7)
    torch.testing.assert_close(pb @ pa, b @ a)
    ta, tb = truncate_factors(pa, pb, 3)
    torch.testing.assert_close(ta, a)
    torch.testing.assert_close(tb, b)
    ta2, tb2 = truncate_factors(a, b, 2)
    torch.testing.assert_close(tb2 @ ta2, b[:, :2] @ a[:2])


def test_stack_is_exact_weighted_sum(gen):
    parts = [rand_factors(gen, r) for r in (2, 4, 8)]
    w = [0.2, 0.5, 0.3]
    a_s, b_s = stack_factors(parts, w)
    assert a_s.shape == (14, 10) and b_s.shape == (12, 14)
    dense = sum(wk * dense_delta(a, b) for wk, (a, b) in zip(w, parts))
    torch.testing.assert_close(b_s @ a_s, dense)


def test_lowrank_svd_equals_truncated_svd_of_dense_sum(gen):
    parts = [rand_factors(gen, r, out_f=30, in_f=20) for r in (2, 4, 8)]
    w = [0.2, 0.5, 0.3]
    dense = sum(wk * dense_delta(a, b) for wk, (a, b) in zip(w, parts))
    u, s, vh = torch.linalg.svd(dense)
    for rank in (1, 4, 8):
        a, b = lowrank_svd(parts, w, rank)
        assert a.shape == (rank, 20) and b.shape == (30, rank)
        ref = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(b @ a, ref, atol=1e-9, rtol=1e-9)
    # full rank (14 = 2+4+8) reproduces the sum exactly; higher ranks zero-pad
    a, b = lowrank_svd(parts, w, 20)
    assert a.shape == (20, 20)
    torch.testing.assert_close(b @ a, dense, atol=1e-9, rtol=1e-9)


def test_lowrank_svd_components_are_sorted_so_truncation_is_optimal(gen):
    parts = [rand_factors(gen, 6, out_f=16, in_f=16)]
    a, b = lowrank_svd(parts, [1.0], 6)
    ta, tb = truncate_factors(a, b, 3)
    a3, b3 = lowrank_svd(parts, [1.0], 3)
    torch.testing.assert_close(tb @ ta, b3 @ a3, atol=1e-9, rtol=1e-9)


def test_init_matches_peft_convention_and_finiteness_check(gen):
    f = init_factors({"m": (12, 10)}, 4, gen)
    a, b = f["m"]
    assert a.shape == (4, 10) and b.shape == (12, 4)
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / 10 ** 0.5
    assert is_finite_adapter(f) is None
    a[0, 0] = float("nan")
    assert is_finite_adapter(f) == "m.A"
    assert is_finite_adapter({}, {"classifier.weight": torch.tensor([float("inf")])}) == "classifier.weight"
