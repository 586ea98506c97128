"""Server optimizers on the aggregated adapter (strategies/server_opt.py), the client's learning-rate
schedule and gradient clipping (fedtune/training/local.py). Unit tests: mock replies, no Ray."""

import itertools
import json
from types import SimpleNamespace
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi

from fedtune.core.config import ConfigError, TrainConfig, config_from_dict
from fedtune.core.protocol import TrainMetrics
from fedtune.lora.factors import ClientUpdate, GlobalAdapter
from fedtune.lora.records import factors_to_record, record_to_state, state_to_record
from fedtune.training.local import (
    _before_step,
    local_optimizer,
    lr_factor,
    rank_learning_rate,
)
from strategies import FlexLoRA, HetLoRA
from strategies.flexlora import aggregate_flexlora
from strategies.server_opt import ServerOptimizer, update_space
from tests.conftest import FakeGrid
from tests.conftest import mock_reply as reply

SHAPES = {"enc.0.q": (6, 5), "enc.0.v": (6, 5)}
HEAD = {"classifier.weight": torch.zeros(2, 5)}
RANKS = (2, 4)


def make(cls=HetLoRA, **federation):
    cfg = config_from_dict({"seed": 3, "lora": {"ranks": list(RANKS)},
                            "federation": {"num_clients": 4, "fraction_train": 1.0, **federation}})
    strat = cls(cfg)
    return strat, strat.initial_state(SHAPES, HEAD)


def client_factors(gen, client):
    rank = RANKS[client % 2]
    factors = {m: (torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen)) for m, (o, i) in SHAPES.items()}
    head = {"classifier.weight": torch.randn(2, 5, generator=gen)}
    return factors, head


def play_round(strat, state, server_round, seed):
    """One round through the strategy's Flower API; returns the new state and the clients' updates."""
    gen = torch.Generator().manual_seed(seed)
    list(strat.configure_train(server_round, state_to_record(state), ConfigRecord(), FakeGrid(4)))
    replies, updates = [], []
    for client in range(4):
        factors, head = client_factors(gen, client)
        metrics = TrainMetrics(num_examples=10 + client, train_loss=0.5).to_record()
        replies.append(reply(100 + client, RecordDict({"arrays": factors_to_record(factors, head),
                                                      "metrics": MetricRecord(metrics)})))
        updates.append(ClientUpdate(client, RANKS[client % 2], factors, head, 10 + client))
    arrays, _ = strat.aggregate_train(server_round, replies)
    strat.round_result(server_round)
    return record_to_state(arrays), updates


def tensors(state):
    out = {f"{m}.{w}": t for m, (a, b) in state.adapter.items() for w, t in (("A", a), ("B", b))}
    return {**out, **state.head}


def assert_states_equal(s1, s2):
    t1, t2 = tensors(s1), tensors(s2)
    assert t1.keys() == t2.keys()
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k


pytestmark = pytest.mark.usefixtures("task_identity")


def test_avgm_with_momentum_0_and_lr_1_is_the_plain_aggregate_bit_for_bit():
    plain, s_plain = make()
    avgm, s_avgm = make(server_optimizer="avgm", server_momentum=0.0, server_lr=1.0)
    assert plain.server_opt is None and "server_opt" not in plain.state_dict()
    for rnd in (1, 2, 3):
        s_plain, _ = play_round(plain, s_plain, rnd, seed=rnd)
        s_avgm, _ = play_round(avgm, s_avgm, rnd, seed=rnd)
        assert_states_equal(s_plain, s_avgm)


def test_avgm_momentum_follows_the_heavy_ball_rule():
    plain, _ = make()
    avgm, s0 = make(server_optimizer="avgm", server_momentum=0.9, server_lr=0.5)
    s1, _ = play_round(avgm, s0, 1, seed=1)
    agg1, _ = play_round(plain, s0, 1, seed=1)  # the same round without the optimizer
    s2, _ = play_round(avgm, s1, 2, seed=2)
    agg2, _ = play_round(plain, s1, 2, seed=2)  # plain HetLoRA's aggregate from s1 is avgm's round-2 aggregate
    for k, x0 in tensors(s0).items():
        d1 = tensors(agg1)[k].double() - x0.double()
        torch.testing.assert_close(tensors(s1)[k].double(), x0.double() + 0.5 * d1, rtol=1e-6, atol=1e-6)
        d2 = tensors(agg2)[k].double() - tensors(s1)[k].double()
        torch.testing.assert_close(tensors(s2)[k].double(), tensors(s1)[k].double() + 0.5 * (0.9 * d1 + d2),
                                   rtol=1e-6, atol=1e-6)


def _two_states(seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = GlobalAdapter(adapter={"m": (torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen))},
                        head={"h": torch.randn(2, 5, generator=gen)})
    new = GlobalAdapter(adapter={"m": (torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen))},
                        head={"h": torch.randn(2, 5, generator=gen)})
    return old, new


def _flower_step(strategy, old, new, server_round):
    """Flower's own FedOpt step from ``old`` to the aggregate ``new`` (one reply: FedAvg is ``new``)."""
    strategy.current_arrays = {k: t.numpy().copy() for k, t in tensors(old).items()}
    msg = Mock(spec=Message)
    msg.has_error.return_value = False
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(t.numpy()) for k, t in tensors(new).items()}),
                              "metrics": MetricRecord({"num-examples": 5})})
    arrays, _ = strategy.aggregate_train(server_round, [msg])
    return {k: torch.from_numpy(np.asarray(a.numpy())).float() for k, a in arrays.items()}


def test_adam_first_step_matches_a_hand_computation_and_flowers_fedadam():
    old, new = _two_states()
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out, pending = opt.step(old, new, [], "factors", rank=3)
    opt.commit(pending)
    for k, x in tensors(old).items():
        d = tensors(new)[k].double() - x.double()
        m, v = 0.1 * d, 0.01 * d * d
        lr_t = 0.1 * (1 - 0.99) ** 0.5 / (1 - 0.9)
        torch.testing.assert_close(tensors(out)[k].double(), x.double() + lr_t * m / (v.sqrt() + 1e-3))
    # Flower's FedAdam corrects the bias with t = server_round + 1: its round 0 is this optimizer's step 1
    flower = _flower_step(FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3), old, new, server_round=0)
    for k, t in flower.items():
        torch.testing.assert_close(tensors(out)[k], t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "flower", "beta1"), [("yogi", FedYogi, 0.9), ("adagrad", FedAdagrad, 0.0)])
def test_yogi_and_adagrad_match_flower_over_two_rounds(kind, flower, beta1):
    s0, s1 = _two_states(1)
    _, s2 = _two_states(2)
    opt = ServerOptimizer(kind, lr=0.05, beta1=beta1, beta2=0.99, tau=1e-3)
    ref = flower(eta=0.05, tau=1e-3) if kind == "adagrad" else flower(eta=0.05, beta_1=0.9,
                                                                                   beta_2=0.99, tau=1e-3)
    state = s0
    for rnd, agg in ((1, s1), (2, s2)):
        expected = _flower_step(ref, state, agg, rnd)
        state, pending = opt.step(state, agg, [], "factors", rank=3)
        opt.commit(pending)
        for k, t in expected.items():
            torch.testing.assert_close(tensors(state)[k], t, rtol=1e-5, atol=1e-6)


def test_optimizer_state_round_trips_through_the_checkpoint_state_bit_for_bit():
    a, s_a = make(server_optimizer="adam", server_lr=0.01)
    for rnd in (1, 2):
        s_a, _ = play_round(a, s_a, rnd, seed=rnd)
    saved = json.loads(json.dumps(a.state_dict()))  # what meta.json holds
    assert saved["server_opt"]["steps"] == 2
    b, _ = make(server_optimizer="adam", server_lr=0.01)
    b.load_state_dict(saved)
    assert b.server_opt.moments.keys() == a.server_opt.moments.keys()
    for k, t in a.server_opt.moments.items():
        assert torch.equal(b.server_opt.moments[k], t) and t.dtype == torch.float32
    next_a, _ = play_round(a, s_a, 3, seed=3)
    next_b, _ = play_round(b, s_a, 3, seed=3)
    assert_states_equal(next_a, next_b)
    fresh, _ = make(server_optimizer="adam", server_lr=0.01)  # without the moments, round 3 differs
    other, _ = play_round(fresh, s_a, 3, seed=3)
    assert not torch.equal(tensors(other)["enc.0.q.B"], tensors(next_a)["enc.0.q.B"])


def _trunc(w, rank):
    u, s, vh = torch.linalg.svd(w)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_flexlora_steps_the_dense_product_and_refactorises_at_the_global_rank():
    strat, s0 = make(FlexLoRA, server_optimizer="avgm", server_lr=1.5)
    assert update_space(strat) == "dense" and update_space(make()[0]) == "factors"
    s1, updates = play_round(strat, s0, 1, seed=1)
    agg = aggregate_flexlora(updates, strat.global_rank)
    for m in SHAPES:
        p0 = s0.delta(m).double()
        target = p0 + 1.5 * (agg[m][1].double() @ agg[m][0].double() - p0)
        got = s1.delta(m).double()
        assert s1.adapter[m][0].shape == (strat.global_rank, SHAPES[m][1])
        # the product is the optimizer's target up to the truncation at the global rank (Eckart-Young)
        torch.testing.assert_close(got, _trunc(target, strat.global_rank), rtol=1e-5, atol=1e-5)
        tail = torch.linalg.svdvals(target)[strat.global_rank:]
        assert abs(float(torch.linalg.norm(got - target)) - float(tail.norm())) < 1e-4
    assert strat.server_opt.moments["v/dense/enc.0.q"].shape == SHAPES["enc.0.q"]


def test_flora_refuses_a_server_optimizer_naming_both_keys():
    from strategies import FLoRA

    with pytest.raises(ConfigError, match=r"federation\.server_optimizer.*federation\.strategy = 'flora'"):
        make(FLoRA, server_optimizer="adam")


def test_momentum_never_resurrects_a_coordinate_nobody_holds():
    old, new = _two_states(3)
    opt = ServerOptimizer("avgm", momentum=0.9, lr=1.0)
    mid, pending = opt.step(old, new, [], "factors", rank=3)  # round 1: momentum everywhere
    opt.commit(pending)
    keep = torch.tensor([False, True, True, True])  # both clients pruned B's row 0
    b_agg = new.adapter["m"][1].clone()
    b_agg[0] = 0.0  # the masked aggregate: zero where nobody holds the row
    agg = GlobalAdapter(adapter={"m": (new.adapter["m"][0], b_agg)}, head=new.head)
    updates = [ClientUpdate(k, 3, {}, {}, 5, keep={"m": ("rows", keep)}) for k in range(2)]
    out, _ = opt.step(mid, agg, updates, "factors", rank=3)
    assert torch.equal(out.adapter["m"][1][0], torch.zeros(3))
    unmasked, _ = opt.step(mid, agg, [], "factors", rank=3)  # without the masks momentum would move it
    assert torch.count_nonzero(unmasked.adapter["m"][1][0]) > 0


@pytest.mark.parametrize(("key", "value"), [("server_optimizer", "sgd"), ("server_lr", 0.0),
                                            ("server_momentum", 1.0), ("server_beta2", -0.1), ("server_tau", 0.0)])
def test_bad_server_optimizer_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"federation\.{key}"):
        config_from_dict({"federation": {key: value}})


@pytest.mark.parametrize(("key", "value"), [("lr_schedule", "step"), ("warmup_steps", -1), ("max_grad_norm", -1.0),
                                            ("optimizer", "lion"), ("momentum", 1.0), ("momentum", -0.1),
                                            ("adam_eps", 0.0), ("lr_reference_rank", -4)])
def test_bad_train_schedule_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key}"):
        config_from_dict({"train": {key: value}})


def test_schedule_values():
    assert [lr_factor(s, 10, "constant", 0) for s in range(10)] == [1.0] * 10
    cos = [lr_factor(s, 10, "cosine", 0) for s in range(10)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[9] == pytest.approx(0.5 * (1 + np.cos(0.9 * np.pi)))
    assert all(x > y for x, y in itertools.pairwise(cos))
    assert [lr_factor(s, 6, "linear", 2) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert lr_factor(3, 10, "cosine", 4) == pytest.approx(0.8)  # still warming up


def _grads(gen):
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 100
    return params


def test_clipping_bounds_the_gradient_norm_and_the_schedule_sets_the_rate(gen):
    params = _grads(gen)
    opt = torch.optim.AdamW(params, lr=0.01)
    cfg = SimpleNamespace(train=TrainConfig(learning_rate=0.01, max_grad_norm=0.5, lr_schedule="cosine"))
    _before_step(opt, cfg, 5, 10)
    norm = torch.linalg.norm(torch.cat([p.grad.reshape(-1) for p in params]))
    assert float(norm) <= 0.5 + 1e-6 and opt.param_groups[0]["lr"] == pytest.approx(0.005)
    untouched = _grads(torch.Generator().manual_seed(1))
    before = [p.grad.clone() for p in untouched]
    opt2 = torch.optim.AdamW(untouched, lr=0.01)
    _before_step(opt2, SimpleNamespace(train=TrainConfig(learning_rate=0.01)), 5, 10)  # defaults: nothing changes
    assert all(torch.equal(p.grad, b) for p, b in zip(untouched, before)) and opt2.param_groups[0]["lr"] == 0.01


TINY = {"model": {"name": "tiny-bert", "max_length": 32}, "lora": {"ranks": [2]},
        "data": {"partitioner": "iid", "eval_size": 64, "max_examples": 200}, "federation": {"num_clients": 2}}


def tiny_client(cfg):
    """tiny-bert, client 0's tokenised data and a rank-2 payload of the initial global adapter."""
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import head_state, lora_shapes

    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, 2, cfg.seed, cfg.model.num_labels)
    part = tokenize(fed.partition(0), base.tokenizer, cfg.model.task, cfg.model.max_length)
    strat = HetLoRA(cfg)
    return base, part, strat.client_payload(strat.initial_state(lora_shapes(base, cfg), head_state(base)), 0, 2)


def test_local_training_steps_with_clipped_gradients_and_the_scheduled_rate():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fedtune.training.local import train_local

    table = {**TINY, "train": {"local_steps": 4, "batch_size": 8, "learning_rate": 5e-3}}
    plain = config_from_dict(table)
    tuned = config_from_dict({**table, "train": {**table["train"], "lr_schedule": "linear", "warmup_steps": 1,
                                                 "max_grad_norm": 0.01}})
    base, part, payload = tiny_client(plain)
    seen = []

    def record(opt, args, kwargs):
        grads = [p.grad.reshape(-1) for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append((opt.param_groups[0]["lr"], float(torch.linalg.norm(torch.cat(grads)))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        r_plain = train_local(base, payload, 2, part, plain, seed=5)
        r_tuned = train_local(base, payload, 2, part, tuned, seed=5)
    finally:
        handle.remove()
    plain_steps, tuned_steps = seen[:4], seen[4:]
    assert [lr for lr, _ in plain_steps] == [5e-3] * 4 and max(n for _, n in plain_steps) > 0.01
    assert [lr for lr, _ in tuned_steps] == pytest.approx([2.5e-3, 5e-3, 5e-3 * 2 / 3, 5e-3 / 3])
    assert all(n <= 0.01 * (1 + 1e-5) for _, n in tuned_steps)
    module = next(iter(r_plain.factors))
    assert not torch.equal(r_plain.factors[module][1], r_tuned.factors[module][1])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_sgd_steps_in_proportion_to_the_gradient_and_adamw_does_not(name):
    """The reason train.optimizer exists: a client whose loss is already near zero has a tiny gradient;
    SGD then barely moves it, while AdamW's per-coordinate normalisation takes a full-size step."""
    steps = []
    for scale in (1.0, 1e-3):
        p = torch.nn.Parameter(torch.zeros(8))
        p.grad = torch.linspace(-1.0, 1.0, 8) * scale
        opt = local_optimizer([p], TrainConfig(optimizer=name, learning_rate=0.1))
        opt.step()
        steps.append(float(p.detach().abs().sum()))
    if name == "sgd":
        assert steps[1] == pytest.approx(steps[0] * 1e-3)
    else:
        assert steps[1] == pytest.approx(steps[0], rel=1e-3)


def test_a_larger_adam_epsilon_shrinks_the_steps_of_tiny_gradients_only():
    steps = {}
    for eps in (1e-8, 1e-5):
        for scale in (1.0, 1e-4):
            p = torch.nn.Parameter(torch.zeros(4))
            p.grad = torch.full((4,), 1e-2 * scale)
            local_optimizer([p], TrainConfig(learning_rate=0.1, adam_eps=eps)).step()
            steps[eps, scale] = float(p.detach().abs().max())
    assert steps[1e-8, 1e-4] == pytest.approx(steps[1e-8, 1.0], rel=0.02)  # default: a 1e-6 gradient takes a full step
    assert steps[1e-5, 1.0] == pytest.approx(steps[1e-8, 1.0], rel=0.01)  # a gradient far above eps is unaffected
    assert steps[1e-5, 1e-4] < 0.1 * steps[1e-5, 1.0]  # one far below it: lr * g / (g + eps)


def test_the_reference_rank_scales_the_rate_by_the_root_of_the_rank_ratio_and_the_schedule_follows():
    cfg = TrainConfig(learning_rate=2e-3, lr_reference_rank=4)
    assert rank_learning_rate(cfg, 16) == pytest.approx(1e-3)
    assert rank_learning_rate(cfg, 4) == pytest.approx(2e-3)
    assert rank_learning_rate(TrainConfig(learning_rate=2e-3), 16) == 2e-3  # off by default
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    sched = TrainConfig(learning_rate=2e-3, lr_reference_rank=4, lr_schedule="linear")
    opt = local_optimizer([p], sched, rank=16)
    _before_step(opt, SimpleNamespace(train=sched), 5, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)  # the rank's rate, then the schedule's factor


def test_local_training_uses_the_configured_optimizer():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fedtune.training.local import train_local

    cfg = config_from_dict({**TINY, "train": {"local_steps": 2, "batch_size": 8, "learning_rate": 0.05,
                                              "optimizer": "sgd", "momentum": 0.9, "lr_reference_rank": 8}})
    base, part, payload = tiny_client(cfg)
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(
        (type(opt).__name__, opt.param_groups[0]["momentum"], opt.param_groups[0]["lr"])))
    try:
        result = train_local(base, payload, 2, part, cfg, seed=5)
    finally:
        handle.remove()
    assert seen == [("SGD", 0.9, pytest.approx(0.1))] * 2  # rank 2 against reference rank 8: twice the rate
    assert any(float(b.abs().sum()) > 0 for _, b in result.factors.values())  # B starts at zero: SGD moved it
