"""Server optimizers on the aggregated adapter update (FedOpt; Reddi et al., "Adaptive Federated
Optimization", ICLR 2021), as Flower's ``FedAvgM``, ``FedAdam``, ``FedYogi`` and ``FedAdagrad`` apply
them to a model's arrays.

A round's pseudo-gradient is ``delta = aggregate - global`` (the strategy's new global adapter minus
the one it sent); the optimizer turns it into a step and the new global is ``global + step``:

- ``avgm``: ``v = momentum v + delta``, ``step = lr v`` (Flower's FedAvgM: the first round's ``v`` is
  ``delta``, which is the same since ``v`` starts at 0);
- ``adam``: ``m = b1 m + (1 - b1) delta``, ``v = b2 v + (1 - b2) delta^2``, ``step = lr_t m / (sqrt(v) + tau)``
  with ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)`` at the optimizer's ``t``-th step (Flower's FedAdam with
  ``t = server_round + 1``);
- ``yogi``: ``v = v - (1 - b2) delta^2 sign(v - delta^2)``, ``step = lr m / (sqrt(v) + tau)``;
- ``adagrad``: ``v = v + delta^2``, ``step = lr m / (sqrt(v) + tau)`` (with ``b1 = 0`` it is Flower's).

Where the update lives depends on the strategy (:func:`update_space`):

- ``factors``: the global adapter is factors of a fixed rank (HetLoRA, FedIT, FFA-LoRA, trimmed mean):
  every A, B and head tensor is stepped on its own.
- ``dense``: the strategy re-factorises each round (FlexLoRA, geometric median, FedSpine with FlexLoRA
  aggregation: an SVD of the mean product), so factor differences compare unrelated bases. Each
  module is stepped on its product ``delta_W = B'A' - BA`` and ``BA + step`` is re-factorised with a
  truncated SVD at the global rank (exact up to that truncation; moments are ``out x in`` per module).
- FLoRA is refused: its round update is merged into a frozen path whose rank grows each round, and a
  dense optimizer step is of full rank, so every round would be re-compressed by an SVD.

A strategy outside this list declares its space with a class attribute ``server_opt_space``.

Pruning: a coordinate that no client of the round holds (B rows or A columns, or the matching rows
or columns of ``delta_W``) keeps the aggregate's value (zero), and its pseudo-gradient is zero, so
momentum never resurrects a pruned coordinate. The step is computed in float64 and written as
``aggregate + (step - delta)``: with ``avgm``, momentum 0 and lr 1 the result is the aggregate bit for
bit. Moments are float32 and travel with the strategy's checkpoint state (:meth:`ServerOptimizer.state_dict`).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.core.config import ConfigError, FederationConfig
from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter, pad_factors

__all__ = ["OPTIMIZERS", "ServerOptimizer", "build_server_optimizer", "dense_refactor", "update_space"]

OPTIMIZERS = ("avgm", "adam", "yogi", "adagrad")
DENSE_STRATEGIES = frozenset({"flexlora", "geomedian"})  # registry names that re-factorise every round
REFUSED_STRATEGIES = frozenset({"flora"})


def update_space(strategy: Any) -> str:
    """``"factors"`` or ``"dense"``: where ``strategy``'s round update is stepped (see the module docstring)."""
    declared = getattr(strategy, "server_opt_space", None)
    if declared is not None:
        return str(declared)
    if strategy.name in DENSE_STRATEGIES:
        return "dense"
    if strategy.name == "fedspine" and getattr(strategy, "aggregation", "flexlora") == "flexlora":
        return "dense"
    return "factors"


def build_server_optimizer(fed: FederationConfig, strategy_name: str) -> ServerOptimizer | None:
    """The configured optimizer (None for ``"none"``); refuses strategies it does not apply to."""
    if fed.server_optimizer == "none":
        return None
    if strategy_name in REFUSED_STRATEGIES:
        raise ConfigError(f"federation.server_optimizer: {fed.server_optimizer!r} does not apply to "
                          f"federation.strategy = {strategy_name!r} (its update is merged into a frozen path of "
                          f"growing rank); use server_optimizer = \"none\" or another strategy")
    return ServerOptimizer(fed.server_optimizer, lr=fed.server_lr, momentum=fed.server_momentum,
                           beta1=fed.server_beta1, beta2=fed.server_beta2, tau=fed.server_tau)


@dataclass
class _Pending:
    """Moments after a step, committed only when the round's new state is accepted."""

    steps: int
    moments: dict[str, torch.Tensor]


@dataclass
class ServerOptimizer:
    kind: str
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    steps: int = 0  # optimizer steps taken (Adam's bias correction)
    moments: dict[str, torch.Tensor] = field(default_factory=dict)  # "m/<key>", "v/<key>" (float32)

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ConfigError(f"federation.server_optimizer: must be one of none, {', '.join(OPTIMIZERS)}; "
                              f"got {self.kind!r}")

    # ------------------------------------------------------------------ the update rule

    def _direction(self, key: str, delta: torch.Tensor, t: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float64 step for one tensor's pseudo-gradient ``delta`` (float64); new moments go to ``out``."""
        def prev(name: str) -> torch.Tensor:
            old = self.moments.get(f"{name}/{key}")
            if old is not None and old.shape != delta.shape:
                raise ValueError(f"server optimizer: {key} changed shape from {tuple(old.shape)} to "
                                 f"{tuple(delta.shape)}; its moments no longer apply")
            return torch.zeros_like(delta) if old is None else old.double()

        if self.kind == "avgm":
            v = self.momentum * prev("v") + delta
            out[f"v/{key}"] = v.float()
            return self.lr * v
        m = self.beta1 * prev("m") + (1.0 - self.beta1) * delta
        v, sq = prev("v"), delta * delta
        if self.kind == "adam":
            v = self.beta2 * v + (1.0 - self.beta2) * sq
        elif self.kind == "yogi":
            v = v - (1.0 - self.beta2) * sq * torch.sign(v - sq)
        else:  # adagrad
            v = v + sq
        out[f"m/{key}"], out[f"v/{key}"] = m.float(), v.float()
        lr = self.lr
        if self.kind == "adam":
            lr = self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        return lr * m / (v.clamp_min(0.0).sqrt() + self.tau)

    def _tensor(self, key: str, old: torch.Tensor, new: torch.Tensor, held: torch.Tensor | None, t: int,
                out: dict[str, torch.Tensor]) -> torch.Tensor:
        """``new`` moved by the optimizer: ``old + step``, the aggregate's value where nobody holds a coordinate."""
        delta = new.double() - old.double()
        if held is not None:
            delta = torch.where(held, delta, torch.zeros_like(delta))
        step = self._direction(key, delta, t, out)
        moved = new.double() + (step - delta)
        if held is not None:
            moved = torch.where(held, moved, new.double())
        return moved.to(new.dtype)

    # ------------------------------------------------------------------ one round

    def step(self, current: GlobalAdapter, aggregate: GlobalAdapter, updates: list[ClientUpdate],
             space: str, rank: int) -> tuple[GlobalAdapter, _Pending]:
        """The new global state from the strategy's ``aggregate`` of ``updates`` and the ``current`` global;
        the moments it implies are returned, for :meth:`commit` once the state is accepted."""
        t = self.steps + 1
        out: dict[str, torch.Tensor] = {}
        adapter: Factors = {}
        for m, (a1, b1) in aggregate.adapter.items():
            if m not in current.adapter:
                adapter[m] = (a1, b1)
                continue
            a0, b0 = current.adapter[m]
            rows, cols = held_coordinates(updates, m, b1.shape[0], a1.shape[1])
            if space == "dense":
                p0, p1 = (b0.double() @ a0.double()), (b1.double() @ a1.double())
                held = None if rows is None and cols is None else _outer(rows, cols, p1.shape)
                w = self._tensor(f"dense/{m}", p0, p1, held, t, out)
                adapter[m] = dense_refactor(w, rank, a1.dtype)
            elif space == "factors":
                a_held = None if cols is None else cols[None, :].expand_as(a1)
                b_held = None if rows is None else rows[:, None].expand_as(b1)
                adapter[m] = (self._tensor(f"A/{m}", a0, a1, a_held, t, out),
                              self._tensor(f"B/{m}", b0, b1, b_held, t, out))
            else:
                raise ValueError(f"server optimizer: unknown update space {space!r} (factors or dense)")
        head = {k: self._tensor(f"head/{k}", current.head[k], x, None, t, out) if k in current.head else x
                for k, x in aggregate.head.items()}
        return GlobalAdapter(adapter=adapter, frozen=aggregate.frozen, head=head), _Pending(t, out)

    def commit(self, pending: _Pending) -> None:
        """Adopt the moments of an accepted step."""
        self.steps, self.moments = pending.steps, {**self.moments, **pending.moments}

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the step count and the moments as base64 safetensors (exact)."""
        blob = st_save({k: v.contiguous() for k, v in sorted(self.moments.items())}) if self.moments else b""
        return {"kind": self.kind, "steps": self.steps, "moments": base64.b64encode(blob).decode("ascii")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint: server optimizer {state['kind']!r} != federation.server_optimizer "
                             f"{self.kind!r}")
        self.steps = int(state.get("steps", 0))
        blob = base64.b64decode(state.get("moments", ""))
        self.moments = dict(st_load(blob)) if blob else {}


def held_coordinates(updates: list[ClientUpdate], module: str, out_f: int,
                     in_f: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Boolean vectors over B's rows and A's columns that some client of the round holds (None: all
    held). A client without pruning information for ``module`` holds all of it."""
    pruned = [u.keep[module] for u in updates if module in u.keep]
    if not pruned or len(pruned) < len(updates):
        return None, None
    union = torch.stack([keep.reshape(-1).bool() for _, keep in pruned]).any(0)
    if bool(union.all()):
        return None, None
    size = out_f if pruned[0][0] == "rows" else in_f
    if union.numel() != size:
        raise ValueError(f"{module}: pruning mask has {union.numel()} entries for {size} {pruned[0][0]}")
    return (union, None) if pruned[0][0] == "rows" else (None, union)


def _outer(rows: torch.Tensor | None, cols: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """The (out, in) mask of ``delta_W`` entries whose row and column are both held."""
    r = rows if rows is not None else torch.ones(shape[0], dtype=torch.bool)
    c = cols if cols is not None else torch.ones(shape[1], dtype=torch.bool)
    return r[:, None] & c[None, :]


def dense_refactor(w: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of a dense ``(out, in)`` update as factors ``(A, B)``,
    ``A = sqrt(S) V^T`` and ``B = U sqrt(S)`` (the convention of :func:`fedtune.lora.factors.lowrank_svd`)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    a, b = (root[:, None] * vh[:k]).to(dtype), (u[:, :k] * root).to(dtype)
    return pad_factors(a, b, rank) if k < rank else (a, b)
