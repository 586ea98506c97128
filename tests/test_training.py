"""Client training and server evaluation on a tiny random BERT/Llama with real peft."""

import pytest
import torch

from fedtune.core.config import config_from_dict
from fedtune.data.batching import tokenize
from fedtune.data.partition import cached_federated_data
from fedtune.lora.attach import attach_lora, detach_lora, lora_layers
from fedtune.lora.factors import GlobalAdapter, adapter_rank, dense_delta
from fedtune.models.loading import cached_base_model
from fedtune.training.local import evaluate_global, head_state, lora_shapes, train_local
from strategies import HetLoRA


def experiment(model="tiny-bert", task="classification", **over):
    table = {
        "model": {"name": model, "task": task, "max_length": 32},
        "lora": {"ranks": [2, 4], "alpha": 8.0},
        "data": {"dataset": "rotten-tomatoes", "partitioner": "iid", "eval_size": 64, "max_examples": 400},
        "train": {"local_steps": 6, "batch_size": 8, "learning_rate": 5e-3},
        "federation": {"num_clients": 4},
    }
    for key, value in over.items():
        table.setdefault(key, {}).update(value)
    return config_from_dict(table)


@pytest.fixture(scope="module")
def bert():
    cfg = experiment()
    base = cached_base_model(cfg.model, cfg.seed)
    fed = cached_federated_data(cfg.data, cfg.model.task, 4, cfg.seed, cfg.model.num_labels)
    part = tokenize(fed.partition(0), base.tokenizer, cfg.model.task, cfg.model.max_length)
    ev = tokenize(fed.eval, base.tokenizer, cfg.model.task, cfg.model.max_length)
    return cfg, base, part, ev


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_local_training_moves_the_adapter_and_leaves_the_base_untouched(bert):
    cfg, base, part, _ = bert
    before = snapshot(base.model)
    strat = HetLoRA(cfg)
    state = strat.initial_state(lora_shapes(base, cfg), head_state(base))
    payload = strat.client_payload(state, client_id=1, rank=4)
    res = train_local(base, payload, 4, part, cfg, seed=7)
    assert adapter_rank(res.factors) == 4 and res.steps == 6 and res.num_examples == len(part)
    moved = [m for m, (a, b) in res.factors.items() if torch.count_nonzero(b) > 0]
    assert moved == list(res.factors)  # every B left zero
    assert not torch.equal(res.head["classifier.weight"], state.head["classifier.weight"])
    after = snapshot(base.model)
    assert after.keys() == before.keys()  # no LoRA modules left behind
    for k in before:
        torch.testing.assert_close(after[k], before[k])
    assert not any(p.requires_grad for p in base.model.parameters())


def test_training_is_reproducible_from_the_seed(bert):
    cfg, base, part, _ = bert
    strat = HetLoRA(cfg)
    payload = strat.client_payload(strat.initial_state(lora_shapes(base, cfg), head_state(base)), 0, 2)
    r1 = train_local(base, payload, 2, part, cfg, seed=11)
    r2 = train_local(base, payload, 2, part, cfg, seed=11)
    for m in r1.factors:
        torch.testing.assert_close(r1.factors[m][1], r2.factors[m][1])
    assert r1.train_loss == r2.train_loss


def test_frozen_a_is_not_trained(bert):
    cfg, base, part, _ = bert
    strat = HetLoRA(cfg)
    payload = strat.client_payload(strat.initial_state(lora_shapes(base, cfg), head_state(base)), 0, 2)
    res = train_local(base, payload, 2, part, cfg, train_a=False, seed=1)
    for m, (a, _) in res.factors.items():
        torch.testing.assert_close(a, payload.adapter[m][0])


def test_loaded_factors_reproduce_the_product_through_peft_scaling(bert):
    cfg, base, _, _ = bert
    from fedtune.lora.attach import load_factors, read_factors

    gen = torch.Generator().manual_seed(0)
    shapes = lora_shapes(base, cfg)
    factors = {m: (torch.randn(4, i, generator=gen), torch.randn(o, 4, generator=gen)) for m, (o, i) in shapes.items()}
    peft_model = attach_lora(base, 4, cfg.lora)
    try:
        load_factors(peft_model, factors)
        layer = next(iter(lora_layers(peft_model).values()))
        assert layer.scaling["default"] == pytest.approx(8.0 / 4)
        back = read_factors(peft_model)
    finally:
        detach_lora(peft_model, base)
    for m, (a, b) in factors.items():
        torch.testing.assert_close(dense_delta(*back[m]), b @ a)


def test_frozen_path_equals_the_same_update_as_an_adapter(bert):
    """FLoRA's frozen delta (a forward hook) acts exactly like the adapter it came from."""
    cfg, base, _, ev = bert
    gen = torch.Generator().manual_seed(5)
    shapes = lora_shapes(base, cfg)
    delta = {m: (torch.randn(4, i, generator=gen) * 0.3, torch.randn(o, 4, generator=gen) * 0.3)
             for m, (o, i) in shapes.items()}
    zero = {m: (torch.zeros(2, i), torch.zeros(o, 2)) for m, (o, i) in shapes.items()}
    head = head_state(base)
    as_adapter = evaluate_global(base, GlobalAdapter(adapter=delta, head=head), ev, cfg)
    as_frozen = evaluate_global(base, GlobalAdapter(adapter=zero, frozen=delta, head=head), ev, cfg)
    plain = evaluate_global(base, GlobalAdapter(adapter=zero, head=head), ev, cfg)
    assert as_adapter["eval_loss"] == pytest.approx(as_frozen["eval_loss"], rel=1e-5)
    assert as_adapter["eval_loss"] != pytest.approx(plain["eval_loss"], rel=1e-5)


def test_causal_lm_reports_perplexity_and_trains():
    cfg = experiment(model="tiny-llama", task="causal-lm", data={"dataset": "chatterbot"})
    base = cached_base_model(cfg.model, cfg.seed)
    assert base.head_names == [] and base.architecture == "llama"
    fed = cached_federated_data(cfg.data, cfg.model.task, 4, cfg.seed)
    part = tokenize(fed.partition(0), base.tokenizer, "causal-lm", 32)
    ev = tokenize(fed.eval, base.tokenizer, "causal-lm", 32)
    strat = HetLoRA(cfg)
    state = strat.initial_state(lora_shapes(base, cfg), {})
    assert set(state.adapter) and all(m.endswith(("q_proj", "v_proj")) for m in state.adapter)
    metrics = evaluate_global(base, state, ev, cfg)
    assert metrics["eval_perplexity"] > 1.0
    res = train_local(base, strat.client_payload(state, 0, 2), 2, part, cfg, seed=0)
    assert res.train_loss > 0 and all(torch.count_nonzero(b) for _, b in res.factors.values())


def test_label_log_prior_is_smoothed_log_frequency():
    from fedtune.data.batching import label_log_prior

    torch.testing.assert_close(label_log_prior([0, 0, 0, 1], 3), torch.tensor([4 / 7, 2 / 7, 1 / 7]).log())


def test_logit_adjustment_keeps_a_one_label_client_from_biasing_the_head(bert):
    """A client with 6 positives per negative: with the prior offset its head bias drifts much less."""
    import dataclasses

    from fedtune.data.batching import Tokenized

    cfg, base, part, _ = bert
    pos = [i for i, y in enumerate(part.labels) if y == 1]
    neg = [i for i, y in enumerate(part.labels) if y == 0][: max(1, len(pos) // 6)]
    skewed = Tokenized([part.input_ids[i] for i in pos + neg], [1] * len(pos) + [0] * len(neg))
    strat = HetLoRA(cfg)
    payload = strat.client_payload(strat.initial_state(lora_shapes(base, cfg), head_state(base)), 0, 2)
    drift = {}
    for tau in (0.0, 1.0):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logit_adjustment=tau, local_steps=30))
        res = train_local(base, payload, 2, skewed, c, seed=3)
        bias = res.head["classifier.bias"]
        drift[tau] = float(bias[1] - bias[0])
    assert drift[0.0] > 0.02 and drift[1.0] < 0.5 * drift[0.0]


def test_chunked_causal_lm_loss_matches_transformers_loss_and_gradients():
    """The chunked cross-entropy equals transformers' loss and gives the same LoRA gradients."""
    from fedtune.core.config import config_from_dict
    from fedtune.lora.attach import attach_lora, detach_lora, lora_layers
    from fedtune.models.loading import cached_base_model
    from fedtune.training.loss import chunked_causal_lm_loss

    cfg = config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm", "max_length": 32}})
    base = cached_base_model(cfg.model, cfg.seed)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    peft_model = attach_lora(base, 4, cfg.lora)
    try:
        for layer in lora_layers(peft_model).values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1, generator=gen)
        inner = peft_model.base_model.model
        grads = []
        for loss_fn in (lambda: peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                        lambda: chunked_causal_lm_loss(inner, ids, mask, labels, chunk_tokens=7)):
            peft_model.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for n, p in inner.named_parameters() if "lora_" in n]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        for g_ref, g in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(g_ref, g, rtol=1e-4, atol=1e-6)
    finally:
        detach_lora(peft_model, base)


def test_fused_linear_cross_entropy_gradients_for_every_input():
    from fedtune.training.loss import _LinearCrossEntropy

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(23, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (23,), generator=gen)
    ref = torch.nn.functional.cross_entropy(h @ w.T + b, y)
    ref_grads = torch.autograd.grad(ref * 2.0, (h, w, b))
    got = _LinearCrossEntropy.apply(h, w, b, y, 5)
    got_grads = torch.autograd.grad(got * 2.0, (h, w, b))
    torch.testing.assert_close(got, ref.float())
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r)
