"""Attack matrix: how far one hostile client moves each aggregation rule's global adapter.

One round of every rule is played through the strategy's real Flower plumbing (train messages
out, replies as Flower records in, ``aggregate_train``) with six honest clients and one
attacker. Honest clients move the adapter they were sent in a shared direction plus their own
noise (ranks 2 and 4 alternate; FedIT, which needs equal ranks, runs at rank 4). Attacks:

- ``scale100``: the attacker's change is an honest-like change times 100;
- ``huge1e19``: its factors hold entries near 1e19;
- ``const1e30``: every entry is 1e30;
- ``examples1e15``: an ordinary-sized change in its own direction, claiming 1e15 examples;
- ``bool``: its tensors are bool, of the right shapes;
- ``no_client_id``: its node answers the identify query without a client id;
- ``steps_inf``: an honest change whose metrics claim ``steps = inf``.

The distance is ``||W - W_h||_F / ||W_h - W_0||_F`` over every module's ``B A`` and the head,
where ``W`` is the global model after the round with the attacker, ``W_h`` after the same round
with the honest clients alone and ``W_0`` the model before it: 0 means the attacker changed
nothing, 1 means it moved the model as far as the whole honest round did. Each rule is played
with the default ``[defense]`` (updates clipped at 3x the round's median change, examples
capped at the partition size) and with it off (``norm_multiple = 0``, no example cap).

    .venv/bin/python simulations/bench/attacks.py [--out simulations/results/attacks.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ATTACKS = ("scale100", "huge1e19", "const1e30", "examples1e15", "bool", "no_client_id", "steps_inf")
RULES = ("hetlora", "flexlora", "fedit", "flora", "ffalora", "trimmed-mean", "geomedian")
SHAPES = {"layer.0.q": (8, 6), "layer.0.v": (8, 6), "layer.1.q": (8, 6)}
HEAD_SHAPE = (2, 6)
HONEST = 6
PARTITION = 40  # examples each client was assigned


class _Grid:
    """Nodes 100+i serve client i; the attacker's node may answer the identify query badly."""

    def __init__(self, n: int, bad_identify: int | None = None) -> None:
        self.nodes = [100 + i for i in range(n)]
        self.bad_identify = bad_identify

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Any]:
        from unittest.mock import Mock

        from flwr.app import ConfigRecord, Message, RecordDict

        from fedtune.core.protocol import CONFIG

        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            info = {"device": ""} if node == self.bad_identify else {"client_id": node - 100, "device": ""}
            msg = Mock(spec=Message)
            msg.metadata.src_node_id = node
            msg.has_error.return_value = False
            msg.content = RecordDict({CONFIG: ConfigRecord(info)})
            out.append(msg)
        return out


def _reply(node: int, content: Any) -> Any:
    from unittest.mock import Mock

    from flwr.app import Message

    msg = Mock(spec=Message)
    msg.metadata.src_node_id = node
    msg.has_error.return_value = False
    msg.content = content
    return msg


def _strategy(rule: str, defense: bool, seed: int) -> Any:
    from fedtune.core.config import config_from_dict
    from strategies.registry import build_strategy

    ranks = [4] if rule == "fedit" else [2, 4]
    table: dict[str, Any] = {"seed": seed, "lora": {"ranks": ranks},
                             "federation": {"num_clients": HONEST + 1, "fraction_train": 1.0, "strategy": rule}}
    if not defense:
        table["defense"] = {"norm_multiple": 0.0, "max_examples": 10**18}
    cfg = config_from_dict(table)
    return build_strategy(cfg, partition_size=(lambda cid: PARTITION) if defense else None)


def _content(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], head: dict[str, torch.Tensor],
             metrics: dict[str, float], as_bool: bool = False) -> Any:
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from fedtune.lora.records import factors_to_record

    record = factors_to_record(factors, head)
    if as_bool:
        record = ArrayRecord({k: v.to(torch.bool) for k, v in record.to_torch_state_dict().items()})
    return RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})


def _dense(state: Any) -> torch.Tensor:
    """The model's LoRA change as one vector: every module's ``B A`` (trainable plus frozen parts) and the head."""
    parts = []
    for m, (a, b) in sorted(state.adapter.items()):
        w = b.double() @ a.double()
        if m in state.frozen:
            fa, fb = state.frozen[m]
            w = w + fb.double() @ fa.double()
        parts.append(w.reshape(-1))
    parts += [t.double().reshape(-1) for _, t in sorted(state.head.items())]
    return torch.cat(parts)


def play_round(rule: str, attack: str | None, defense: bool = True, seed: int = 0) -> tuple[Any, Any, list[dict]]:
    """One round of ``rule`` with six honest clients and (unless None) the attacker;
    returns (state before, state after, the round's client records)."""
    from flwr.app import ConfigRecord

    from fedtune.core.protocol import TrainMetrics
    from fedtune.lora.records import record_to_state, state_to_record

    strat = _strategy(rule, defense, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    state0 = strat.initial_state(SHAPES, {"head.weight": torch.randn(*HEAD_SHAPE, generator=gen) * 0.1})
    n = HONEST + (attack is not None)
    grid = _Grid(n, bad_identify=100 + HONEST if attack == "no_client_id" else None)
    messages = list(strat.configure_train(1, state_to_record(state0), ConfigRecord(), grid))
    direction = {m: (torch.randn(4, i, generator=gen), torch.randn(o, 4, generator=gen)) for m, (o, i) in SHAPES.items()}
    head_dir = torch.randn(*HEAD_SHAPE, generator=gen)
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        sent = record_to_state(msg.content["arrays"])
        attacker = attack is not None and node == 100 + HONEST
        step = 0.05
        factors, head = {}, {}
        for m, (a, b) in sent.adapter.items():
            r = a.shape[0]
            da = direction[m][0][:r] + 0.3 * torch.randn(r, a.shape[1], generator=gen)
            db = direction[m][1][:, :r] + 0.3 * torch.randn(b.shape[0], r, generator=gen)
            if not strat.trains_a:
                da = torch.zeros_like(da)
            if attacker and attack == "examples1e15":
                da, db = -3 * direction[m][0][:r], -3 * direction[m][1][:, :r]
            scale = 100.0 if attacker and attack == "scale100" else 1.0
            factors[m] = (a + step * scale * da, b + step * scale * db)
            if attacker and attack == "huge1e19":
                factors[m] = (a + 1e19 * torch.sign(da), b + 1e19 * torch.sign(db))
            if attacker and attack == "const1e30":
                factors[m] = (torch.full_like(a, 1e30), torch.full_like(b, 1e30))
        for k, t in sent.head.items():
            noise = 0.3 * torch.randn(*t.shape, generator=gen)
            head[k] = t + step * (-3 * head_dir if attacker and attack == "examples1e15" else head_dir + noise)
        metrics = TrainMetrics(num_examples=PARTITION, train_loss=0.5, steps=10, tokens=100).to_record()
        if attacker and attack == "examples1e15":
            metrics["num_examples"] = 10**15
        if attacker and attack == "steps_inf":
            metrics["steps"] = math.inf
        replies.append(_reply(node, _content(factors, head, metrics, as_bool=attacker and attack == "bool")))
    arrays, _ = strat.aggregate_train(1, replies)
    result = strat.round_result(1)
    state1 = record_to_state(arrays) if arrays is not None else state0
    return state0, state1, result.clients


def distance(rule: str, attack: str, defense: bool = True, seed: int = 0) -> dict[str, Any]:
    """The attacker's effect on one round of ``rule`` (see the module docstring)."""
    w0, honest, _ = play_round(rule, None, defense, seed)
    _, attacked, records = play_round(rule, attack, defense, seed)
    ref = _dense(honest) - _dense(w0)
    dist = float((_dense(attacked) - _dense(honest)).norm() / ref.norm())
    honest_ok = sum(1 for r in records if r["client_id"] < HONEST and r["status"] == "ok")
    attacker = [r for r in records if r["client_id"] == HONEST]
    return {"distance": dist if math.isfinite(dist) else None, "honest_kept": honest_ok,
            "attacker": (attacker[0]["status"] if attacker else "not sampled"),
            "clipped": bool(attacker and attacker[0].get("clip_scale", 1.0) < 1.0)}


def matrix(seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for defense in (True, False):
        key = "defense_on" if defense else "defense_off"
        out[key] = {}
        for rule in RULES:
            out[key][rule] = {}
            for attack in ATTACKS:
                runs = [distance(rule, attack, defense, s) for s in seeds]
                dists = [r["distance"] for r in runs]
                out[key][rule][attack] = {**runs[0], "distance": None if None in dists else max(dists)}
    return out


def main() -> None:
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "simulations/results/attacks.json")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    seeds = tuple(range(args.seeds))
    result = {"command": "python simulations/bench/attacks.py --seeds " + str(args.seeds),
              "machine": f"{platform.machine()}, {platform.python_version()}", "seeds": list(seeds),
              "distance": "max over seeds of ||W - W_honest|| / ||W_honest - W_0|| (B A of every module and the head)",
              **matrix(seeds)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key in ("defense_on", "defense_off"):
        print(f"\n{key}: distance to the honest-only round (status of the attacker)")
        print("| attack | " + " | ".join(RULES) + " |")
        print("|---" * (len(RULES) + 1) + "|")
        for attack in ATTACKS:
            cells = []
            for rule in RULES:
                c = result[key][rule][attack]
                d = "inf/nan" if c["distance"] is None else f"{c['distance']:.3g}"
                cells.append(f"{d} ({c['attacker']}{', clipped' if c['clipped'] else ''})")
            print(f"| {attack} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
