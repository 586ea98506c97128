"""Tensor <-> Flower record conversion."""

import pytest
import torch
from flwr.app import ArrayRecord

from fedtune.lora.factors import GlobalAdapter
from fedtune.lora.records import RecordError, record_to_state, state_to_record
from tests.conftest import rand_factors


def test_roundtrip_keeps_every_tensor(gen):
    state = GlobalAdapter(
        adapter={"bert.encoder.layer.0.attention.self.query": tuple(t.float() for t in rand_factors(gen, 4))},
        frozen={"bert.encoder.layer.0.attention.self.query": tuple(t.float() for t in rand_factors(gen, 2))},
        head={"classifier.weight": torch.randn(2, 12, generator=gen)},
    )
    back = record_to_state(state_to_record(state))
    for part in ("adapter", "frozen"):
        for m, (a, b) in getattr(state, part).items():
            torch.testing.assert_close(getattr(back, part)[m][0], a)
            torch.testing.assert_close(getattr(back, part)[m][1], b)
    torch.testing.assert_close(back.head["classifier.weight"], state.head["classifier.weight"])


def test_malformed_records_are_rejected_with_the_key():
    with pytest.raises(RecordError, match="unexpected key 'weights'"):
        record_to_state(ArrayRecord({"weights": torch.zeros(2)}))
    with pytest.raises(RecordError, match="needs both A and B"):
        record_to_state(ArrayRecord({"adapter::m::A": torch.zeros(2, 3)}))
    with pytest.raises(RecordError, match=r"adapter::m: A \(2, 3\) and B \(4, 5\)"):
        record_to_state(ArrayRecord({"adapter::m::A": torch.zeros(2, 3), "adapter::m::B": torch.zeros(4, 5)}))
