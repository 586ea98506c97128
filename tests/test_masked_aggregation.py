"""Aggregation under pruning: every registered rule against a dense, coordinate-by-coordinate reference.

The rule (tracker issue 13, item 1): a coordinate of the aggregate is the strategy's own weighted
mean over the clients that still hold it, with the strategy's own weights. Rows of B (q/k/v/up/gate)
or columns of A (o/down) that a client pruned do not count for that client; coordinates nobody
holds stay zero. Factor-averaging rules (FedIT, HetLoRA) are compared factor by factor,
product rules (FlexLoRA, FLoRA) and FFA-LoRA by the dense update ``B @ A``.
"""

import pytest
import torch

from fedtune.core.config import config_from_dict
from fedtune.lora.factors import ClientUpdate, pad_factors
from strategies import STRATEGIES

SHAPES = {"layer.0.q": (12, 10), "layer.0.o": (12, 10), "layer.0.v": (12, 10)}
HOW = {"layer.0.q": "rows", "layer.0.o": "cols"}  # layer.0.v: nobody prunes it
EXAMPLES = (10, 30, 20, 40)
HET_RANKS = (2, 4, 3, 4)
GLOBAL_RANK = 4


def pruned(size, *idx):
    keep = torch.ones(size, dtype=torch.bool)
    keep[list(idx)] = False
    return keep


# per client: module -> keep vector; every client pruned row 11 of q and column 9 of o (nobody holds them)
KEEP = [
    {"layer.0.q": pruned(12, 0, 1, 2, 3, 4, 5, 11), "layer.0.o": pruned(10, 9)},
    {"layer.0.q": pruned(12, 3, 4, 5, 6, 7, 8, 11), "layer.0.o": pruned(10, 0, 1, 2, 3, 9)},
    {"layer.0.q": pruned(12, 11), "layer.0.o": pruned(10, 9)},
    {"layer.0.q": pruned(12, 0, 1, 11), "layer.0.o": pruned(10, 2, 3, 4, 5, 6, 9)},
]

# (registry name, strategy options): every registered strategy, FedSpine with both of its rules
CASES = [
    ("fedit", {}),
    ("hetlora", {}),
    ("flexlora", {}),
    ("flexlora", {"global_rank": 10}),  # rank >= rank of the dense mean: the SVD is exact
    ("flora", {}),
    ("ffalora", {}),
    ("fedspine", {"aggregation": "flexlora"}),
    ("fedspine", {"aggregation": "hetlora"}),
    ("trimmed-mean", {"trim": 0.25}),
    ("geomedian", {}),
    ("geomedian", {"global_rank": 10}),
]


def test_every_registered_strategy_is_covered():
    assert {name for name, _ in CASES} == set(STRATEGIES)


def rule_of(name, options):
    return options.get("aggregation", "flexlora") if name == "fedspine" else name


def server_aggregate(strat, updates, state):
    """What ``LoraStrategy.aggregate_train`` does with the round's validated updates."""
    return strat.aggregate(updates, state)


def holds(k, m, i, j):
    """Whether client k still holds coordinate (i, j) of module m's update."""
    keep = KEEP[k].get(m)
    if keep is None:
        return True
    return bool(keep[i] if HOW[m] == "rows" else keep[j])


def masked_mean(values, weights, held):
    """sum_k w_k x_k / sum_k w_k over the holders; 0 when nobody holds the coordinate."""
    total = sum(w for w, h in zip(weights, held) if h)
    if not any(held):
        return 0.0
    if total == 0:  # holders with zero weight only: a plain mean over the holders
        return sum(x for x, h in zip(values, held) if h) / sum(held)
    return sum(w * x for x, w, h in zip(values, weights, held) if h) / total


def make_case(name, options, gen, prune=True):
    """The strategy, its initial state and four clients: pruned (coordinates zero, as sent), or not."""
    rule = rule_of(name, options)
    ranks = (GLOBAL_RANK,) * 4 if rule == "fedit" else HET_RANKS
    cfg = config_from_dict({"lora": {"ranks": list(ranks)}, "federation": {"num_clients": 4},
                            "policy": {"ranks": sorted(set(ranks))}})
    strat = STRATEGIES[name](cfg, **{"global_rank": GLOBAL_RANK, **options})
    state = strat.initial_state(SHAPES, {})
    updates = []
    for k, (r, n) in enumerate(zip(ranks, EXAMPLES)):
        factors = {}
        for m, (out_f, in_f) in SHAPES.items():
            a = torch.randn(r, in_f, generator=gen, dtype=torch.float64)
            if not strat.trains_a:  # FFA-LoRA: the frozen global A, truncated to the client's rank
                a = state.adapter[m][0][:r].double().clone()
            b = torch.randn(out_f, r, generator=gen, dtype=torch.float64)
            if not prune:
                pass
            elif HOW.get(m) == "rows":
                b[~KEEP[k][m]] = 0.0  # prune-and-tune zeroes pruned B rows ...
            elif HOW.get(m) == "cols":
                a[:, ~KEEP[k][m]] = 0.0  # ... and pruned A columns
            factors[m] = (a, b)
        keep = {m: (HOW[m], KEEP[k][m].clone()) for m in HOW} if prune else {}
        updates.append(ClientUpdate(client_id=k, rank=r, factors=factors, head={}, num_examples=n, keep=keep))
    state.adapter = {m: (a.double(), b.double()) for m, (a, b) in state.adapter.items()}
    return strat, state, updates


def dense_weiszfeld(updates, iterations=3000):
    """Geometric-median weights of the clients' dense products (every module), from the mean."""
    x = torch.stack([torch.cat([(u.factors[m][1] @ u.factors[m][0]).reshape(-1) for m in SHAPES]) for u in updates])
    z = x.mean(0)
    for _ in range(iterations):
        d = (x - z).norm(dim=1).clamp_min(1e-12)
        w = 1 / d
        z = (w[:, None] * x).sum(0) / w.sum()
    beta = torch.linalg.lstsq(x.T, z[:, None]).solution.reshape(-1)
    return [float(b) for b in beta]


def trimmed_reference(parts, held, current, trim):
    """Per coordinate: the holders' values, sorted, the floor(trim * holders) largest and smallest
    dropped, the rest averaged; the current value where nobody holds it."""
    import math

    out = current.clone()
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in out.shape]):
        idx = tuple(int(i) for i in idx)
        xs = sorted(float(p[idx]) for p, h in zip(parts, held) if h[idx])
        if xs:
            cut = min(math.floor(trim * len(xs)), (len(xs) - 1) // 2)
            out[idx] = sum(xs[cut:len(xs) - cut]) / (len(xs) - 2 * cut)
    return out


def rule_weights(rule, updates, m):
    if rule == "geomedian":
        return dense_weiszfeld(updates)
    if rule == "hetlora":  # HetLoRA: ||B_k A_k||_F (dense here)
        return [torch.linalg.matrix_norm(u.factors[m][1] @ u.factors[m][0]).item() for u in updates]
    return [float(u.num_examples) for u in updates]  # the others: example counts


def dense_reference(m, products, weights):
    out_f, in_f = SHAPES[m]
    ref = torch.zeros(out_f, in_f, dtype=torch.float64)
    for i in range(out_f):
        for j in range(in_f):
            held = [holds(k, m, i, j) for k in range(len(products))]
            ref[i, j] = masked_mean([p[i, j] for p in products], weights, held)
    return ref


def factor_reference(m, parts, weights):
    """Factor-wise masked mean: B row i over the holders of row i, A column j over the holders of column j."""
    r = parts[0][0].shape[0]
    out_f, in_f = SHAPES[m]
    a_ref = torch.zeros(r, in_f, dtype=torch.float64)
    b_ref = torch.zeros(out_f, r, dtype=torch.float64)
    for j in range(in_f):
        held = [HOW.get(m) != "cols" or holds(k, m, 0, j) for k in range(len(parts))]
        for c in range(r):
            a_ref[c, j] = masked_mean([a[c, j] for a, _ in parts], weights, held)
    for i in range(out_f):
        held = [HOW.get(m) != "rows" or holds(k, m, i, 0) for k in range(len(parts))]
        for c in range(r):
            b_ref[i, c] = masked_mean([b[i, c] for _, b in parts], weights, held)
    return a_ref, b_ref


def truncated(d, rank):
    u, s, vh = torch.linalg.svd(d)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" if o else n for n, o in CASES])
def test_each_coordinate_is_the_rules_weighted_mean_over_its_holders(name, options, gen):
    strat, state, updates = make_case(name, options, gen)
    rule = rule_of(name, options)
    new = server_aggregate(strat, updates, state)
    for m in SHAPES:
        weights = rule_weights(rule, updates, m)
        if rule in ("fedit", "hetlora"):
            parts = [pad_factors(*u.factors[m], strat.global_rank) for u in updates]
            a_ref, b_ref = factor_reference(m, parts, weights)
            torch.testing.assert_close(new.adapter[m][0].double(), a_ref, atol=1e-6, rtol=1e-6, msg=f"{m}: A")
            torch.testing.assert_close(new.adapter[m][1].double(), b_ref, atol=1e-6, rtol=1e-6, msg=f"{m}: B")
            continue
        if rule == "trimmed-mean":
            r = strat.global_rank
            parts = [pad_factors(*u.factors[m], r) for u in updates]
            held_a = [torch.tensor([[c < u.rank and (HOW.get(m) != "cols" or holds(k, m, 0, j)) for j in range(SHAPES[m][1])]
                                    for c in range(r)]) for k, u in enumerate(updates)]
            held_b = [torch.tensor([[c < u.rank and (HOW.get(m) != "rows" or holds(k, m, i, 0)) for c in range(r)]
                                    for i in range(SHAPES[m][0])]) for k, u in enumerate(updates)]
            a_ref = trimmed_reference([a for a, _ in parts], held_a, state.adapter[m][0], 0.25)
            b_ref = trimmed_reference([b for _, b in parts], held_b, state.adapter[m][1], 0.25)
            torch.testing.assert_close(new.adapter[m][0].double(), a_ref, atol=1e-6, rtol=1e-6, msg=f"{m}: A")
            torch.testing.assert_close(new.adapter[m][1].double(), b_ref, atol=1e-6, rtol=1e-6, msg=f"{m}: B")
            continue
        products = [u.factors[m][1] @ u.factors[m][0] for u in updates]  # what each client's model moved
        ref = dense_reference(m, products, weights)
        if rule in ("flexlora", "geomedian"):
            ref = truncated(ref, strat.global_rank)
            got = new.adapter[m][1] @ new.adapter[m][0]
        elif rule == "flora":  # merged into the frozen part; the adapter restarts at B = 0
            got = new.delta(m)
        else:  # ffalora: A stays the frozen global A
            a_global = state.adapter[m][0]
            torch.testing.assert_close(new.adapter[m][0].double(), a_global)
            if HOW.get(m) == "cols":
                # column-dependent weights do not fit a fixed A: B is the least-squares fit of the
                # dense holder mean, i.e. the mean projected onto the row space of A
                ref = ref @ torch.linalg.pinv(a_global) @ a_global
            got = new.delta(m)
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6, msg=m)


def test_hetlora_row_held_by_half_the_clients_is_their_norm_weighted_mean(gen):
    """The issue's example: a B row held by 2 of 4 clients is their norm-weighted mean, not ~1.75x it."""
    cfg = config_from_dict({"lora": {"ranks": [4]}, "federation": {"num_clients": 4}})
    strat = STRATEGIES["hetlora"](cfg)
    state = strat.initial_state({"m": (6, 5)}, {})
    b_row = torch.randn(4, generator=gen, dtype=torch.float64)
    updates = []
    for k, n in enumerate((100, 100, 1, 1)):  # many examples on the clients that pruned row 0
        a = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        b = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        b[0] = b_row if k >= 2 else 0.0
        keep = torch.ones(6, dtype=torch.bool)
        keep[0] = k >= 2
        updates.append(ClientUpdate(client_id=k, rank=4, factors={"m": (a, b)}, head={}, num_examples=n,
                                    keep={"m": ("rows", keep)}))
    new = server_aggregate(strat, updates, state)
    torch.testing.assert_close(new.adapter["m"][1][0].double(), b_row, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_without_masks_the_rules_are_unchanged(name, gen):
    """No pruning information: the masked mean is the rule's plain weighted mean."""
    strat, state, updates = make_case(name, {}, gen, prune=False)
    new = server_aggregate(strat, updates, state)
    rule = rule_of(name, {})
    for m in SHAPES:
        weights = rule_weights(rule, updates, m)
        total = sum(weights)
        if rule in ("fedit", "hetlora"):
            parts = [pad_factors(*u.factors[m], strat.global_rank) for u in updates]
            a = sum(w / total * pa for w, (pa, _) in zip(weights, parts))
            b = sum(w / total * pb for w, (_, pb) in zip(weights, parts))
            torch.testing.assert_close(new.adapter[m][0].double(), a, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(new.adapter[m][1].double(), b, atol=1e-12, rtol=1e-12)
            continue
        if rule == "trimmed-mean":  # covered against its own reference above
            continue
        dense = sum(w / total * (u.factors[m][1] @ u.factors[m][0]) for w, u in zip(weights, updates))
        if rule in ("flexlora", "geomedian"):
            got, dense = new.adapter[m][1] @ new.adapter[m][0], truncated(dense, strat.global_rank)
        else:
            got = new.delta(m)
        torch.testing.assert_close(got.double(), dense, atol=1e-9, rtol=1e-9)
