"""Tokenised examples and their minibatches: tokenize once, collate padded batches, draw
seeded minibatch indices, and the label prior used for logit adjustment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["label_log_prior", "Tokenized", "tokenize", "batches"]


@dataclass
class Tokenized:
    """Pre-tokenised examples: variable-length token id lists and (optional) labels."""

    input_ids: list[list[int]]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(ds: Any, tokenizer: Any, task: str, max_length: int) -> Tokenized:
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    labels = list(ds["label"]) if task == "classification" else None
    return Tokenized(input_ids=[list(x) for x in enc["input_ids"]], labels=labels)


def collate(data: Tokenized, idx: list[int], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    width = max(len(data.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        seq = data.input_ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        assert data.labels is not None
        batch["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` minibatches drawn epoch by epoch from a seeded permutation of ``range(n)``."""
    out: list[list[int]] = []
    perm: list[int] = []
    while len(out) < steps:
        if len(perm) < min(batch_size, n):
            perm += torch.randperm(n, generator=generator).tolist()
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


def label_log_prior(labels: list[int], num_labels: int) -> torch.Tensor:
    """log of the client's label frequencies (add-one smoothed), shape (num_labels,).

    Training on ``logits + tau * log p_k(y)`` (logit adjustment, Menon et al., ICLR 2021;
    in FL as FedLC, Zhang et al., ICML 2022) lets the local label prior be explained by
    this fixed offset instead of the shared task head, so heads trained on label-skewed
    clients average to a balanced classifier. Evaluation uses the raw logits.
    """
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_labels).float() + 1.0
    return (counts / counts.sum()).log()
