import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def rand_factors(gen: torch.Generator, rank: int, out_f: int = 12, in_f: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64)
    b = torch.randn(out_f, rank, generator=gen, dtype=torch.float64)
    return a, b


def masked_logits(base, state, rank, cfg, masks, ids):
    """Logits of ``base`` with ``state``'s adapter at ``rank`` and ``masks`` applied (no slicing):
    what an exported pruned model must reproduce."""
    from fedtune.pruning.structure import apply_masks, model_structure
    from fedtune.training.local import _prepare, _release, head_state

    own = head_state(base)
    peft_model, handles = _prepare(base, state, rank, cfg)
    mask_handles = apply_masks(peft_model.base_model.model, model_structure(base.model), masks)
    try:
        with torch.no_grad():
            return peft_model(input_ids=ids).logits
    finally:
        for h in mask_handles:
            h.remove()
        _release(peft_model, base, handles, own)
