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
