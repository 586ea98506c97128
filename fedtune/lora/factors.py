"""Pure LoRA algebra: the data types of an adapter and the maths the strategies share.

Convention used everywhere in fedtune: an adapter for one linear module is a pair of
factors ``(A, B)`` with ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)``, and
the weight update it stands for is ``delta_W = B @ A`` (shape ``(out, in)``). The LoRA
scale ``s = alpha / r`` of the peft layer a client trains is *folded into B* when an
adapter leaves the client (``B_sent = s * B_peft``) and divided out when it is loaded,
so adapters of different ranks and alphas compare and combine directly.

No function here builds the dense ``out x in`` matrix except the ``dense_*`` helpers,
which exist for tests and small references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Factors", "GlobalAdapter", "ClientUpdate", "adapter_rank", "dense_delta", "pad_factors", "truncate_factors", "stack_factors", "lowrank_svd", "init_factors", "is_finite_adapter", "scale_for_holders"]


# module name -> (A (r x in), B (out x r))
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GlobalAdapter:
    """The server's model state between rounds.

    ``adapter``: the trainable global LoRA (rank ``r_global``), sent to clients projected
    to their rank. ``frozen``: a low-rank update already merged into the base (FLoRA);
    clients add it as a frozen path. ``head``: full task-head tensors (classification).
    """

    adapter: Factors = field(default_factory=dict)
    frozen: Factors = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, module: str) -> torch.Tensor:
        """Dense update of one module (adapter + frozen), for tests and small references."""
        out = None
        for part in (self.adapter, self.frozen):
            if module in part:
                d = dense_delta(*part[module])
                out = d if out is None else out + d
        if out is None:
            raise KeyError(module)
        return out


@dataclass
class ClientUpdate:
    """One client's reply, decoded: its trained adapter at its own rank and metadata."""

    client_id: int
    rank: int
    factors: Factors
    head: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    # pruning: module -> ("rows" | "cols", bool keep vector over B's rows / A's columns)
    keep: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


def adapter_rank(factors: Factors) -> int:
    """Rank of an adapter (the rank of its first module; all modules share it)."""
    if not factors:
        return 0
    a, _ = next(iter(factors.values()))
    return int(a.shape[0])


def dense_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A``: (out, r) @ (r, in) -> (out, in)."""
    return b @ a


def pad_factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A`` (rows) and ``B`` (columns) from rank r to ``rank`` >= r; product unchanged."""
    r = a.shape[0]
    if rank < r:
        raise ValueError(f"pad_factors: target rank {rank} < current rank {r}")
    if rank == r:
        return a, b
    a_pad = torch.zeros(rank, a.shape[1], dtype=a.dtype)
    b_pad = torch.zeros(b.shape[0], rank, dtype=b.dtype)
    a_pad[:r] = a
    b_pad[:, :r] = b
    return a_pad, b_pad


def truncate_factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``rank`` components: ``A[:rank]`` (rank, in), ``B[:, :rank]`` (out, rank).

    Zero-pads instead when ``rank`` exceeds the current rank.
    """
    if rank >= a.shape[0]:
        return pad_factors(a, b, rank)
    return a[:rank].clone(), b[:, :rank].clone()


def stack_factors(
    parts: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack factors so that ``B_s @ A_s == sum_k w_k B_k A_k`` exactly (FLoRA).

    ``A_s`` is ``[A_1; ...; A_K]`` (sum r_k, in); ``B_s`` is ``[w_1 B_1, ..., w_K B_K]``
    (out, sum r_k).
    """
    a_s = torch.cat([a for a, _ in parts], dim=0)
    b_s = torch.cat([w * b for (_, b), w in zip(parts, weights, strict=True)], dim=1)
    return a_s, b_s


def lowrank_svd(
    parts: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of ``sum_k w_k B_k A_k`` without the dense matrix.

    With ``B_s = [sqrt(w_k) B_k]`` (out, R) and ``A_s^T = [sqrt(w_k) A_k]^T`` (in, R):
    ``B_s = Q_b R_b``, ``A_s^T = Q_a R_a`` (reduced QR), core ``C = R_b R_a^T`` (R, R),
    ``C = U S V^T``; then ``sum = (Q_b U) S (Q_a V)^T``. Returns ``A = sqrt(S) (Q_a V)^T``
    (rank, in) and ``B = (Q_b U) sqrt(S)`` (out, rank), components sorted by singular
    value, so truncating the result to a smaller rank keeps the best approximation.
    Weights may be negative (the square root takes the sign onto B). Cost O((out+in) R^2).
    """
    sq = [math.sqrt(abs(w)) for w in weights]
    sign = [1.0 if w >= 0 else -1.0 for w in weights]
    b_s = torch.cat([s * g * b for (_, b), s, g in zip(parts, sq, sign, strict=True)], dim=1).double()
    a_s = torch.cat([s * a for (a, _), s in zip(parts, sq, strict=True)], dim=0).double()
    q_b, r_b = torch.linalg.qr(b_s)  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a_s.T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # (R, R)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b_new = (q_b @ u[:, :k]) * root  # (out, k)
    a_new = root[:, None] * (vh[:k] @ q_a.T)  # (k, in)
    dtype = parts[0][0].dtype
    a_new, b_new = a_new.to(dtype), b_new.to(dtype)
    if k < rank:
        a_new, b_new = pad_factors(a_new, b_new, rank)
    return a_new, b_new


def init_factors(
    shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> Factors:
    """peft's default LoRA init: A ~ kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(in)), B = 0.

    ``shapes`` maps module name -> (out_features, in_features).
    """
    out: Factors = {}
    for name, (fan_out, fan_in) in sorted(shapes.items()):
        bound = 1.0 / math.sqrt(fan_in)
        a = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
        out[name] = (a, torch.zeros(fan_out, rank))
    return out


def scale_for_holders(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """Mask-aware aggregation: each coordinate is averaged only over the clients holding it.

    For a module whose rows (q/k/v/up/gate) or columns (o/down) some clients pruned, let
    ``c = sum_k p_k keep_k`` (``p_k = n_k / sum n``) per row or column. Every client's B rows
    (or A columns) are zeroed where pruned and divided by ``c``, so any weighted sum
    ``sum_k p_k X_k`` an aggregation rule forms (of B, or of the products B A) becomes
    ``sum_k p_k keep_k X_k / c``: the average over the holders. Coordinates no client holds
    stay zero. Updates without pruning information are returned unchanged.
    """
    if not any(u.keep for u in updates):
        return updates
    total = float(sum(u.num_examples for u in updates))
    modules = {m for u in updates for m in u.keep}
    coverage: dict[str, torch.Tensor] = {}
    how: dict[str, str] = {}
    for m in modules:
        for u in updates:
            if m in u.keep:
                how[m], size = u.keep[m][0], u.keep[m][1].numel()
                break
        c = torch.zeros(size)
        for u in updates:
            keep = u.keep[m][1] if m in u.keep else torch.ones(size, dtype=torch.bool)
            c += (u.num_examples / total) * keep.float()
        coverage[m] = c
    out = []
    for u in updates:
        factors = dict(u.factors)
        for m, c in coverage.items():
            a, b = factors[m]
            keep = u.keep[m][1].float() if m in u.keep else torch.ones_like(c)
            factor = torch.where(c > 0, keep / c.clamp_min(1e-12), torch.zeros_like(c))
            if how[m] == "rows":
                factors[m] = (a, b * factor[:, None])
            else:
                factors[m] = (a * factor[None, :], b)
        out.append(ClientUpdate(client_id=u.client_id, rank=u.rank, factors=factors, head=u.head,
                                num_examples=u.num_examples, train_loss=u.train_loss, metrics=u.metrics,
                                keep=u.keep))
    return out


def is_finite_adapter(factors: Factors, head: dict[str, torch.Tensor] | None = None) -> str | None:
    """Return the name of the first tensor with a NaN/inf entry, or None when all are finite."""
    for name, (a, b) in factors.items():
        if not torch.isfinite(a).all():
            return f"{name}.A"
        if not torch.isfinite(b).all():
            return f"{name}.B"
    for name, t in (head or {}).items():
        if not torch.isfinite(t).all():
            return name
    return None
