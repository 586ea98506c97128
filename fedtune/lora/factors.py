"""Pure LoRA algebra: the data types of an adapter and the maths the strategies share.

Convention used everywhere in fedtune: an adapter for one linear module is a pair of
factors ``(A, B)`` with ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)``, and
the weight update it stands for is ``delta_W = B @ A`` (shape ``(out, in)``). The LoRA
scale ``s = alpha / r`` (``alpha / sqrt(r)`` with ``lora.rslora``) of the peft layer a client
trains is *folded into B* when an adapter leaves the client (``B_sent = s * B_peft``) and
divided out when it is loaded, so adapters of different ranks, alphas and scalings compare
and combine directly.

Under structured pruning every rule averages each coordinate over the clients that still
hold it, with its own weights (:func:`holder_weights`).

No function here builds the dense ``out x in`` matrix except the ``dense_*`` helpers,
which exist for tests and small references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Factors", "GlobalAdapter", "ClientUpdate", "adapter_rank", "dense_delta", "pad_factors", "truncate_factors", "stack_factors", "lowrank_svd", "init_factors", "is_finite_adapter",
           "HolderWeights", "holder_weights"]


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


@dataclass(frozen=True)
class HolderWeights:
    """The weights of a masked weighted mean for one module: every coordinate of the aggregate is a
    rule's own weighted mean over the clients that still hold it.

    ``axis`` says which coordinates clients pruned: ``"rows"`` (B's rows: q/k/v/up/gate),
    ``"cols"`` (A's columns: o/down) or None (nobody pruned the module). ``plain[k]`` is client k's
    weight normalised over all clients; ``coords[k]`` (a vector over ``axis``; empty when ``axis`` is
    None) is ``w_k keep_k[i] / sum_l w_l keep_l[i]``: it sums to 1 over the clients wherever some
    client holds coordinate i and is 0 where nobody does.
    """

    axis: str | None
    plain: list[float]
    coords: list[torch.Tensor]

    def a_weight(self, k: int, like: torch.Tensor) -> torch.Tensor | float:
        """Client k's weight, broadcastable to its A ``(r, in)``."""
        return self.coords[k].to(like.dtype)[None, :] if self.axis == "cols" else self.plain[k]

    def b_weight(self, k: int, like: torch.Tensor) -> torch.Tensor | float:
        """Client k's weight, broadcastable to its B ``(out, r)``."""
        return self.coords[k].to(like.dtype)[:, None] if self.axis == "rows" else self.plain[k]

    def mean_factors(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Factor-wise masked mean (FedIT, HetLoRA): A's columns and B's rows over their holders."""
        a = sum(self.a_weight(k, a_k) * a_k for k, (a_k, _) in enumerate(parts))
        b = sum(self.b_weight(k, b_k) * b_k for k, (_, b_k) in enumerate(parts))
        return a, b  # type: ignore[return-value]

    def product_parts(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Weighted factors whose products sum to the masked mean of the clients' products ``B_k A_k``
        (FlexLoRA, FLoRA): the weights go onto B's rows or A's columns, or onto B when nobody pruned."""
        out = []
        for k, (a_k, b_k) in enumerate(parts):
            if self.axis == "cols":
                out.append((a_k * self.a_weight(k, a_k), b_k))
            else:
                out.append((a_k, b_k * self.b_weight(k, b_k)))
        return out


def holder_weights(updates: list[ClientUpdate], module: str, weights: list[float]) -> HolderWeights:
    """The masked weighted mean of ``module`` over ``updates`` with a rule's own (unnormalised)
    per-client ``weights`` (example counts, HetLoRA's norms, ...).

    A client without pruning information for ``module`` holds all of it. Where the holders of a
    coordinate all have weight 0 (or all weights are 0), they are averaged uniformly.
    """
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.numel() != len(updates):
        raise ValueError(f"holder_weights: {w.numel()} weights for {len(updates)} updates")
    total = float(w.sum())
    plain = (w / total).tolist() if total > 0 else [1.0 / len(updates)] * len(updates)
    pruned = [u.keep[module] for u in updates if module in u.keep]
    if not pruned:
        return HolderWeights(None, plain, [])
    axes = {how for how, _ in pruned}
    if len(axes) != 1 or not axes <= {"rows", "cols"}:
        raise ValueError(f"{module}: clients pruned it along {sorted(axes)}; expected one of 'rows' or 'cols'")
    axis = axes.pop()
    size = pruned[0][1].numel()
    keep = torch.stack([
        u.keep[module][1].reshape(-1).to(torch.float64) if module in u.keep else torch.ones(size, dtype=torch.float64)
        for u in updates
    ])  # (K, size)
    weighted = w[:, None] * keep
    cover = weighted.sum(0)
    count = keep.sum(0)
    q = torch.where(cover > 0, weighted / cover.clamp_min(1e-300),
                    torch.where(count > 0, keep / count.clamp_min(1.0), torch.zeros_like(keep)))
    return HolderWeights(axis, plain, list(q.unbind(0)))


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
