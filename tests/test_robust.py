"""Robust aggregation and the server's trust boundary: trimmed mean and geometric median
against dense references, bounded contributions, validation from metadata before decoding,
and the attack matrix (one hostile client among honest ones, every rule)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedtune.lora.factors import ClientUpdate
from strategies.geomedian import aggregate_geomedian, gram_matrix, weiszfeld_weights
from strategies.replies import check_arrays
from strategies.trimmed_mean import aggregate_trimmed, trimmed_mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations" / "bench"))

import attacks  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")


def _update(cid, rank, gen, out_f=7, in_f=5, keep=None):
    a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64)
    b = torch.randn(out_f, rank, generator=gen, dtype=torch.float64)
    head = {"h": torch.randn(3, generator=gen, dtype=torch.float64)}
    return ClientUpdate(client_id=cid, rank=rank, factors={"m": (a, b)}, head=head, num_examples=10,
                        keep={"m": keep} if keep is not None else {})


def test_trimmed_mean_matches_a_per_coordinate_reference(gen):
    values = torch.randn(7, 4, 3, generator=gen, dtype=torch.float64)
    held = torch.rand(7, 4, 3, generator=gen) > 0.3
    got, anyheld = trimmed_mean(values, held, 0.2)
    for i in range(4):
        for j in range(3):
            xs = sorted(float(values[k, i, j]) for k in range(7) if held[k, i, j])
            if not xs:
                assert not anyheld[i, j]
                continue
            cut = min(math.floor(0.2 * len(xs)), (len(xs) - 1) // 2)
            ref = np.mean(xs[cut:len(xs) - cut])
            assert abs(float(got[i, j]) - ref) < 1e-12


def test_trimmed_adapter_pads_ranks_respects_pruning_and_keeps_unheld_coordinates(gen):
    rows = torch.tensor([True, False, True, True, True, True, True])
    ups = [_update(0, 2, gen), _update(1, 4, gen, keep=("rows", rows)), _update(2, 4, gen), _update(3, 2, gen)]
    current = {"m": (torch.randn(6, 5, generator=gen, dtype=torch.float64),
                     torch.randn(7, 6, generator=gen, dtype=torch.float64))}
    a, b = aggregate_trimmed(ups, current, 6, 0.25)["m"]
    # components 4, 5: nobody's rank covers them -> the current global's values
    torch.testing.assert_close(a[4:], current["m"][0][4:])
    torch.testing.assert_close(b[:, 4:], current["m"][1][:, 4:])
    # component 3: held by clients 1 and 2 only, and B's row 1 by client 2 alone
    torch.testing.assert_close(a[3], (ups[1].factors["m"][0][3] + ups[2].factors["m"][0][3]) / 2)
    torch.testing.assert_close(b[1, 3], ups[2].factors["m"][1][1, 3])
    # component 0 of A: four holders, trim 0.25 drops the largest and the smallest of each coordinate
    col = torch.stack([u.factors["m"][0][0] for u in ups]).sort(0).values
    torch.testing.assert_close(a[0], col[1:3].mean(0))


def _dense_points(ups):
    return np.stack([np.concatenate([(u.factors["m"][1] @ u.factors["m"][0]).numpy().ravel(), u.head["h"].numpy()])
                     for u in ups])


def test_geometric_median_in_factor_space_matches_a_dense_weiszfeld(gen):
    ups = [_update(k, r, gen) for k, r in enumerate((2, 3, 4, 2, 3))]
    x = _dense_points(ups)
    torch.testing.assert_close(gram_matrix(ups), torch.from_numpy(x @ x.T))
    beta = weiszfeld_weights(gram_matrix(ups), iterations=500, tol=1e-14).numpy()
    z = x.mean(0)  # dense Weiszfeld from the mean
    for _ in range(2000):
        d = np.maximum(np.linalg.norm(x - z, axis=1), 1e-12)
        z = (x / d[:, None]).sum(0) / (1 / d).sum()
    np.testing.assert_allclose(beta @ x, z, rtol=1e-6, atol=1e-8)
    a, b = aggregate_geomedian(ups, 14, torch.from_numpy(beta))["m"]  # rank 14 = sum of ranks: exact
    np.testing.assert_allclose((b @ a).numpy().ravel(), (beta @ x)[:35], rtol=1e-8, atol=1e-8)


def test_geometric_median_ignores_one_far_point(gen):
    ups = [_update(k, 3, gen) for k in range(5)]
    for u in ups[1:]:  # four agreeing clients, one far away
        u.factors["m"] = (ups[0].factors["m"][0] + 0.01 * torch.randn(3, 5, generator=gen, dtype=torch.float64),
                          ups[0].factors["m"][1])
        u.head["h"] = ups[0].head["h"].clone()
    ups[0].factors["m"] = (ups[0].factors["m"][0] * 1e6, ups[0].factors["m"][1])
    beta = weiszfeld_weights(gram_matrix(ups))
    assert float(beta[0]) < 1e-4


def test_metadata_is_checked_before_any_tensor_is_built():
    good = {"x": (2, 3)}
    ok = ArrayRecord({"x": torch.zeros(2, 3)})
    assert check_arrays(ok, good, frozenset({"float32"}), "adapter") > 0
    cases = [
        (ArrayRecord({"x": torch.zeros(2, 3, dtype=torch.bool)}), "dtype 'bool'"),
        (ArrayRecord({"x": torch.zeros(3, 2)}), "shape (3, 2)"),
        (ArrayRecord({"y": torch.zeros(2, 3)}), "extra ['y']"),
        # metadata that lies: a (2, 3) float32 array carrying a megabyte
        (ArrayRecord({"x": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\0" * 2**20)}),
         "carries 1048576 bytes"),
        (ArrayRecord({"x": Array(dtype="float32", shape=(2, 3), stype="pickle", data=b"x")}), "'pickle'"),
    ]
    for record, reason in cases:
        with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            check_arrays(record, good, frozenset({"float32"}), "adapter")
    with pytest.raises(ValueError, match="above the cap of 10"):
        check_arrays(ok, good, frozenset({"float32"}), "adapter", max_bytes=10)


def test_an_update_far_beyond_the_round_median_is_clipped_or_rejected():
    _, _, records = attacks.play_round("hetlora", "scale100")
    by = {r["client_id"]: r for r in records}
    assert by[attacks.HONEST]["status"] == "ok" and 0 < by[attacks.HONEST]["clip_scale"] < 0.1
    assert all("clip_scale" not in by[c] for c in range(attacks.HONEST))
    norms = sorted(by[c]["update_norm"] for c in range(attacks.HONEST))
    assert by[attacks.HONEST]["update_norm"] > 50 * norms[len(norms) // 2]


def test_claimed_examples_are_capped_at_the_assigned_partition():
    _, _, records = attacks.play_round("flexlora", "examples1e15")
    att = next(r for r in records if r["client_id"] == attacks.HONEST)
    assert att["num_examples"] == attacks.PARTITION and att["claimed_examples"] == 10**15


# The attack matrix: every rule, every attack, the default defense. Bounds are the measured
# figures (simulations/results/attacks.json) with headroom; 0 = the attacker changed nothing.
# Mean-type rules move by about the attacker's bounded share; HetLoRA's norm weights give the
# clipped attacker the largest weight. steps_inf is an honest update with a bad count: its
# distance is one honest client's share of the round.
BOUND = {"scale100": 2.0, "huge1e19": 2.0, "const1e30": 2.0, "examples1e15": 1.2, "bool": 1e-9,
         "no_client_id": 1e-9, "steps_inf": 0.3}
ROBUST_BOUND = {"scale100": 0.2, "huge1e19": 0.2, "const1e30": 0.2, "examples1e15": 0.2}


@pytest.mark.parametrize("rule", attacks.RULES)
@pytest.mark.parametrize("attack", attacks.ATTACKS)
def test_attack_matrix(rule, attack):
    res = attacks.distance(rule, attack)
    assert res["honest_kept"] == attacks.HONEST, res
    assert res["distance"] is not None and res["distance"] <= BOUND[attack], res
    if rule in ("trimmed-mean", "geomedian") and attack in ROBUST_BOUND:
        assert res["distance"] <= ROBUST_BOUND[attack], res
    if attack == "bool":
        assert res["attacker"] == "rejected"
    if attack == "no_client_id":
        assert res["attacker"] == "not sampled"


@pytest.mark.parametrize("attack", ["scale100", "huge1e19", "const1e30"])
def test_without_the_defense_the_robust_rules_still_hold_and_the_means_do_not(attack):
    assert attacks.distance("geomedian", attack, defense=False)["distance"] < 0.2
    assert attacks.distance("trimmed-mean", attack, defense=False)["distance"] < 0.2
    hetlora = attacks.distance("hetlora", attack, defense=False)["distance"]
    assert hetlora is None or hetlora > 10
