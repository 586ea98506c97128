"""The stability bench's figures (simulations/bench/stability.py) on hand-made curves: the swing after
the settling round, its ratio to the eval set's standard error, paired final differences and the plot;
and the client-gradient bench's update norm (simulations/bench/client_gradients.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations" / "bench"))


def test_swing_counts_only_rounds_after_settling_and_is_scaled_by_the_standard_error():
    import stability

    curve = [(0, 0.5), (1, 0.41), (2, 0.41), (3, 0.70), (4, 0.80), (5, 0.70)]
    got = stability.stability(curve, settle=3, n_eval=400)
    assert got["mean_abs_change"] == pytest.approx(0.10)
    p = (0.70 + 0.80 + 0.70) / 3
    assert got["change_over_se"] == pytest.approx(0.10 / math.sqrt(p * (1 - p) / 400))
    assert math.isnan(stability.stability(curve, settle=5, n_eval=400)["mean_abs_change"])  # one point: no change


def test_summary_pairs_each_seed_with_the_baseline_of_the_same_seed():
    import stability

    base = {0: [(0, 0.5), (1, 0.6), (2, 0.7)], 1: [(0, 0.5), (1, 0.7), (2, 0.8)]}
    variant = {0: [(0, 0.5), (1, 0.65), (2, 0.75)], 1: [(0, 0.5), (1, 0.7), (2, 0.7)]}
    row = stability.summarise(variant, base, settle=1, window=2, n_eval=500)
    assert row["final_accuracy_per_seed"] == [0.7, 0.7]
    assert row["final_diff_per_seed"] == [pytest.approx(0.05), pytest.approx(-0.05)]
    lo, hi = row["final_diff_ci95"]
    assert lo < 0.0 < hi  # one seed up, one down: the interval straddles zero
    assert "final_diff_vs_baseline" not in stability.summarise(base, None, 1, 2, 500)


def test_plot_writes_one_panel_per_seed(tmp_path):
    import stability

    curves = {0: [(0, 0.48), (1, 0.41), (2, 0.76)], 3: [(0, 0.5), (1, 0.6), (2, 0.7)]}
    out = {"config": "simulations/default.toml", "seeds": [0, 3], "eval_size": 400,
           "variants": {"baseline": stability.summarise(curves, None, 1, 2, 400),
                        "avgm": stability.summarise(curves, curves, 1, 2, 400)}}
    path = tmp_path / "stability.png"
    stability.plot(out, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_defined_variants_collect_their_overrides_and_bad_definitions_are_named():
    import stability

    table = stability.variant_table(["no-prune=prune.ratio=0.0", "no-prune=train.local_steps=4", "r16=lora.ranks=[16]"])
    assert table["no-prune"] == ["prune.ratio=0.0", "train.local_steps=4"]
    assert table["r16"] == ["lora.ranks=[16]"]
    assert table["lr-1e-3"] == stability.VARIANTS["lr-1e-3"]  # the built-ins stay
    with pytest.raises(ValueError, match="'no-prune'"):
        stability.variant_table(["no-prune"])  # no override
    with pytest.raises(ValueError, match="'baseline'"):
        stability.variant_table(["baseline=train.local_steps=4"])  # would change what every difference is against


def test_client_gradients_update_norm_covers_factors_and_head():
    from types import SimpleNamespace

    import client_gradients
    import torch

    start = SimpleNamespace(adapter={"q": (torch.zeros(2, 3), torch.zeros(4, 2))}, head={"w": torch.ones(2)})
    result = SimpleNamespace(factors={"q": (torch.full((2, 3), 1.0), torch.zeros(4, 2))}, head={"w": torch.ones(2) * 3})
    assert client_gradients.update_norm(start, result) == pytest.approx(math.sqrt(6 * 1.0 + 2 * 4.0))


def test_client_gradients_summary_compares_medians_of_one_class_and_mixed_clients():
    import client_gradients

    rows = [{"majority_share": 1.0, "grad_rms": 1e-5, "update_norm_eps_1e-08": 1.5},
            {"majority_share": 0.995, "grad_rms": 3e-5, "update_norm_eps_1e-08": 1.7},
            {"majority_share": 0.95, "grad_rms": 9.0, "update_norm_eps_1e-08": 99.0},  # in neither group
            {"majority_share": 0.6, "grad_rms": 2e-3, "update_norm_eps_1e-08": 1.6}]
    got = client_gradients.summarise(rows, [1e-8])
    assert got["grad_rms_ratio_mixed_over_one_class"] == pytest.approx(2e-3 / 2e-5)
    assert got["update_ratio_one_class_over_mixed_eps_1e-08"] == pytest.approx(1.6 / 1.6)
    assert client_gradients.summarise(rows[3:], [1e-8]) == {}  # no one-class client: nothing to compare
