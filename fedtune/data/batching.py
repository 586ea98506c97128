"""Tokenised examples and their minibatches: tokenize once, collate padded batches, draw
seeded minibatch indices, and the label prior used for logit adjustment.

Causal-LM instruction data (a data set with :data:`fedtune.data.instruct.PROMPT_COLUMN` and
:data:`~fedtune.data.instruct.RESPONSE_COLUMN`) is formatted and tokenised by
:func:`fedtune.data.instruct.tokenize_pairs`, which keeps each example's prompt length;
:func:`collate` then gives the prompt tokens the label -100 (no loss) unless ``loss_on="all"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.data.instruct import (
    PROMPT_COLUMN,
    RESPONSE_COLUMN,
    mask_prompts,
    tokenize_pairs,
)

__all__ = ["Tokenized", "batches", "label_log_prior", "tokenize"]


@dataclass
class Tokenized:
    """Pre-tokenised examples: variable-length token id lists and (optional) labels; for
    instruction data, each example's prompt length and the number of examples dropped because
    no response token fitted."""

    input_ids: list[list[int]]
    labels: list[int] | None
    prompt_lengths: list[int] | None = None
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(ds: Any, tokenizer: Any, task: str, max_length: int) -> Tokenized:
    """Tokenise a data set once: its ``text`` column, or for causal-LM instruction data its
    prompt/response pairs (chat template or plain template, see :mod:`fedtune.data.instruct`)."""
    if task == "causal-lm" and {PROMPT_COLUMN, RESPONSE_COLUMN} <= set(ds.column_names):
        pairs = tokenize_pairs(list(ds[PROMPT_COLUMN]), list(ds[RESPONSE_COLUMN]), tokenizer, max_length)
        return Tokenized(input_ids=pairs.input_ids, labels=None, prompt_lengths=pairs.prompt_lengths,
                         dropped=pairs.dropped)
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    labels = list(ds["label"]) if task == "classification" else None
    return Tokenized(input_ids=[list(x) for x in enc["input_ids"]], labels=labels)


def collate(data: Tokenized, idx: list[int], pad_id: int, task: str,
            loss_on: str = "response") -> dict[str, torch.Tensor]:
    """A padded batch of examples ``idx``. Causal LM: labels are the input ids with padding at
    -100, and for instruction data with ``loss_on="response"`` the prompt tokens too."""
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
        if data.prompt_lengths is not None and loss_on == "response":
            batch["labels"] = mask_prompts(batch["labels"], [data.prompt_lengths[i] for i in idx])
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
