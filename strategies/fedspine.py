"""FedSpine: a bandit assigns every sampled client its (pruning ratio, LoRA rank) each round.

FedSpine (arXiv 2501.02438): each device prunes and fine-tunes with the configuration a
multi-armed bandit picks from observed outcomes only (loss, pruning reached, completion
time; no device profiles). This strategy asks the policy (``policy.name``, any
:class:`fedtune.fleet.policies.Policy`, by registry name, ``module:Class`` or ``file.py:Class``)
for each sampled client's arm, sends each node its own rank-projected adapter and target
ratio, aggregates the heterogeneous ranks with FlexLoRA (default) or HetLoRA, and feeds
each client's reward (:func:`fedtune.fleet.rewards.round_rewards`) back; a reward that cannot
be computed (a missing time or loss) is skipped with a warning on the ``fedtune.fleet`` logger.
Policies that have ``observe(speeds)`` also get the round's finished clients'
:class:`fedtune.fleet.policies.Speed` (FLOP/s and bytes/s on a simulated fleet, else seconds;
S-UCB pools its statistics by that arm-normalised speed); a policy without ``observe`` is
not asked. Two more hooks are optional too: ``begin_round(round, clients)`` is called with the
round's sampled clients before any of them is assigned, ``observe_round(round, records)`` after
the rewards with the round's client records (each carries its ``arm``); the cost-aware
``cost-ucb`` uses both. A registered policy's ``CONFIG_KEYS`` name ``[policy]`` keys it is given
(``cost-ucb``: ``round_time_bound``, ``round_time_bound_s``). The policy's state is saved with
every checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.core.plugins import load_plugin
from fedtune.core.protocol import ClientKey as K
from fedtune.core.protocol import Status
from fedtune.fleet.policies import (
    POLICIES,
    Arm,
    Policy,
    Speed,
    StaticPolicy,
    make_policy,
    policy_options,
)
from fedtune.fleet.rewards import Outcome, round_rewards
from fedtune.lora.factors import ClientUpdate, Factors, GlobalAdapter
from strategies.base import LoraStrategy
from strategies.flexlora import aggregate_flexlora
from strategies.hetlora import aggregate_hetlora

log = logging.getLogger("fedtune.fleet")


def build_policy(experiment: ExperimentConfig) -> Any:
    spec, pc = experiment.policy.name, experiment.policy
    kwargs = dict(pc.args)
    if ":" in spec:
        cls = load_plugin(spec, {}, object, "policy.name")
        try:
            policy = cls(ratios=list(pc.ratios), ranks=list(pc.ranks), seed=experiment.seed, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"policy.name: {spec!r} could not be built: {exc}") from exc
        if not isinstance(policy, Policy):
            raise ConfigError(f"policy.name: {spec!r} lacks assign/update/state_dict/load_state_dict")
        return policy
    if spec == "static":  # the static baseline: one arm per device class, given in policy.args.arms
        arms = kwargs.pop("arms", None)
        if not isinstance(arms, dict) or not arms:
            raise ConfigError("policy.args.arms: the static policy needs {device class = [ratio, rank], ...}")
        classes = [name for name, count in experiment.fleet.devices.items() for _ in range(count)]
        if not classes:
            raise ConfigError("policy.name: 'static' assigns arms by device class and needs fleet.devices")
        missing = sorted(set(classes) - set(arms))
        if missing:
            raise ConfigError(f"policy.args.arms: no arm for device class {missing[0]!r}")
        return StaticPolicy({k: Arm(float(v[0]), int(v[1])) for k, v in arms.items()},
                            dict(enumerate(classes)), seed=experiment.seed)
    kwargs = {**policy_options(spec, pc), **kwargs}
    try:
        return make_policy(spec, ratios=list(pc.ratios), ranks=list(pc.ranks), seed=experiment.seed, **kwargs)
    except KeyError:
        raise ConfigError(f"policy.name: unknown policy {spec!r} (registered: {', '.join(sorted(POLICIES))};"
                          " or module:Class or path/to/file.py:Class)") from None
    except TypeError as exc:
        raise ConfigError(f"policy.args: {exc}") from exc


class FedSpine(LoraStrategy):
    name = "fedspine"

    def __init__(self, experiment: ExperimentConfig, *, aggregation: str = "flexlora", **options: Any) -> None:
        if aggregation not in ("flexlora", "hetlora"):
            raise ConfigError(f"federation.strategy_args.aggregation: 'flexlora' or 'hetlora', got {aggregation!r}")
        options.setdefault("global_rank", max(experiment.policy.ranks))
        super().__init__(experiment, **options)
        self.aggregation = aggregation
        self.policy = build_policy(experiment)
        self.arms: dict[tuple[int, int], Arm] = {}
        self.sparsity: dict[int, float] = {}  # latest sparsity each client reached

    def sample_nodes(self, grid: Any, server_round: int) -> list[int]:
        """The base class's seeded sample; a policy with ``begin_round`` is told the round's clients."""
        nodes = super().sample_nodes(grid, server_round)
        begin = getattr(self.policy, "begin_round", None)
        if callable(begin):
            begin(server_round, [self.node_clients[n] for n in nodes])
        return nodes

    def arm(self, client_id: int, server_round: int) -> Arm:
        key = (server_round, client_id)
        if key not in self.arms:
            self.arms[key] = self.policy.assign(client_id, server_round)
        return self.arms[key]

    def rank_for(self, client_id: int, server_round: int) -> int:
        return int(self.arm(client_id, server_round).rank)

    def prune_ratio_for(self, client_id: int, server_round: int) -> float:
        ratio = float(self.arm(client_id, server_round).ratio)
        pc = self.experiment.policy
        if pc.ratio_mode == "step":  # prune `ratio` further than the client's current sparsity, up to the target
            return min(pc.target_sparsity, self.sparsity.get(client_id, 0.0) + ratio)
        return ratio

    def aggregate_adapters(self, updates: list[ClientUpdate], current: GlobalAdapter) -> Factors:
        if self.aggregation == "hetlora":
            return aggregate_hetlora(updates, self.global_rank)
        return aggregate_flexlora(updates, self.global_rank)

    def after_round(self, server_round: int, records: list[dict[str, Any]]) -> None:
        """Reward every client that was sent an arm this round (failures score 0; a reward that
        cannot be computed is skipped and logged), then report the finished clients' speeds."""
        target = self.experiment.policy.target_sparsity
        rewards = round_rewards([Outcome.from_record(r) for r in records], target=target)
        for rec, reward in zip(records, rewards):
            client = rec[K.CLIENT_ID]
            key = (server_round, client)
            if key not in self.arms:
                continue
            arm = self.arms.pop(key)
            rec[K.ARM] = {"ratio": arm.ratio, "rank": arm.rank}
            if rec[K.STATUS] == Status.OK:
                self.sparsity[client] = float(rec.get(K.PRUNE_RATIO, 0.0))
            if not math.isfinite(reward):
                log.warning("round %d: no reward for client %d (arm %s): its seconds or losses are missing or "
                            "not finite", server_round, client, arm)
                continue
            rec[K.REWARD] = round(reward, 4)
            self.policy.update(client, arm, reward)
        observe = getattr(self.policy, "observe", None)  # optional: policies that pool by observed speed
        speeds = {r[K.CLIENT_ID]: Speed.from_record(r) for r in records if r[K.STATUS] == Status.OK}
        if callable(observe) and speeds:
            observe(speeds)
        observe_round = getattr(self.policy, "observe_round", None)  # optional: the round's records, with arms
        if callable(observe_round):
            observe_round(server_round, records)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "policy": self.policy.state_dict(),
                "sparsity": {str(k): v for k, v in self.sparsity.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
        self.sparsity = {int(k): float(v) for k, v in state.get("sparsity", {}).items()}
