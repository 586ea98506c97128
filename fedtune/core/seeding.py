"""Seeds derived from the run's seed and a key: one formula for every random stream.

Every stream a run draws from (client sampling, a client's minibatches and dropout, the fleet's
availability and speed jitter, a bandit learner's exploration, FLoRA's fresh adapters) is seeded
by ``derive_seed(run_seed, *keys)``, where ``keys`` name the stream (a string) and its position
(round, client id, ...). The derivation is a cryptographic hash of the whole key, so distinct keys
give independent-looking seeds that never collide by arithmetic (``seed * P + round`` schemes
collide as soon as a key exceeds the multiplier), and the same key gives the same seed in every
process and on every machine.
"""

from __future__ import annotations

import hashlib
import random

import torch

__all__ = ["derive_seed", "rng", "torch_generator"]


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream ``keys`` of a run seeded ``seed``."""
    text = "/".join([str(int(seed)), *(f"{type(k).__name__}:{k}" for k in keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def rng(seed: int, *keys: int | str) -> random.Random:
    """A Python generator for the stream ``keys``."""
    return random.Random(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch generator for the stream ``keys``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
