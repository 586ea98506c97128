"""A memory-lean causal-LM loss: cross-entropy of the LM head computed in token chunks, so the
``(tokens, vocab)`` logits are never materialised at once.
"""

from __future__ import annotations

from typing import Any

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ W^T (+ b)`` computed chunk by chunk, with the gradient of ``h``
    (and of ``W``, ``b`` when they train) formed in the same pass: the (tokens x vocab) logits
    never exist as a whole and nothing is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = max(int(y.numel()), 1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], y[start:start + chunk]
            logits = (hc @ weight.T).float()
            if bias is not None:
                logits = logits + bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            r = rows[: hc.shape[0]]
            total = total + (lse - logits[r, yc]).sum()
            g = torch.exp(logits - lse[:, None])  # softmax, then minus the one-hot target
            g[r, yc] -= 1.0
            g = g / n
            grad_h[start:start + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += g.T @ hc.float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, *(t for t in (grad_w, grad_b) if t is not None))
        ctx.has = (grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        grad_h, *rest = ctx.saved_tensors
        gw = rest.pop(0).to(ctx.dtypes[0]) * grad_out if ctx.has[0] else None
        gb = rest.pop(0).to(ctx.dtypes[1]) * grad_out if ctx.has[1] else None
        return grad_h * grad_out.to(grad_h.dtype), gw, gb, None, None


def chunked_causal_lm_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Next-token cross-entropy (mean over labelled tokens, as transformers computes it) without
    materialising the (tokens x vocab) logits: the decoder's hidden states go through the output
    layer ``chunk_tokens`` at a time, and each chunk's gradient is formed as it is computed
    (:class:`_LinearCrossEntropy`), so only one chunk of logits is alive at any moment.

    Positions whose next-token label is -100 (padding; the prompt of instruction data) are left
    out before the output layer: they add nothing to the loss or to its mean's denominator, and
    their hidden states get an exactly zero gradient. A batch without a labelled token has loss 0."""
    trunk = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    return _LinearCrossEntropy.apply(h[keep], head.weight, head.bias, y[keep], chunk_tokens)
