"""Federated data: a held-out evaluation split and one partition per client.

Partitioning uses Flower Datasets' partitioners (IID, Dirichlet, ...) over the corpus as a
``datasets.Dataset``; the corpus is loaded and partitioned once per process and cached under
its (data config, task, clients, seed) key. A client's partition is built as a ``Dataset`` only
when it is asked for (a sampled client); the partition sizes of the whole federation, which the
checks before a run need, come from the partitioner's index table without building one
``Dataset`` per client (a few milliseconds each, i.e. tens of seconds for 10,000 clients).
With ``data.client_eval_fraction`` each client holds out a seeded fraction of its partition for
federated evaluation; its training split is the rest, and the sizes above count only that.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedtune.core.config import ConfigError, DataConfig
from fedtune.core.seeding import rng
from fedtune.data.corpora import load_corpus

__all__ = ["split_corpus", "make_partitioner", "FederatedData", "cached_federated_data", "client_eval_count",
           "client_eval_indices"]


def split_corpus(ds: Any, eval_size: int, seed: int, stratify: str = "") -> tuple[Any, Any]:
    """Seeded shuffle, then (train, held-out server eval of ``eval_size`` examples). With ``stratify`` (a
    column), every value of that column gets its share of the held-out set (largest remainders), the
    examples taken in shuffled order."""
    if eval_size >= len(ds):
        raise ConfigError(f"data.eval_size: {eval_size} leaves no training data (corpus has {len(ds)})")
    ds = ds.shuffle(seed=seed)
    if not stratify:
        return ds.select(range(eval_size, len(ds))), ds.select(range(eval_size))
    if stratify not in ds.column_names:
        raise ConfigError(f"data.eval_stratify: the corpus has no column {stratify!r}"
                          f" (columns: {', '.join(ds.column_names)})")
    values = ds[stratify]
    by_value: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        by_value.setdefault(v, []).append(i)
    exact = {v: eval_size * len(ix) / len(values) for v, ix in by_value.items()}
    quota = {v: int(q) for v, q in exact.items()}
    for v in sorted(exact, key=lambda v: (quota[v] - exact[v], str(v)))[: eval_size - sum(quota.values())]:
        quota[v] += 1
    held = sorted(i for v, ix in by_value.items() for i in ix[: quota[v]])
    chosen = set(held)
    return ds.select([i for i in range(len(ds)) if i not in chosen]), ds.select(held)


def client_eval_count(size: int, fraction: float) -> int:
    """How many of a partition's ``size`` examples its client holds out for evaluation:
    ``floor(size * fraction)``, at least one when ``fraction > 0``, never all (0 below 2 examples)."""
    if fraction <= 0 or size < 2:
        return 0
    return min(size - 1, max(1, int(size * fraction)))


def client_eval_indices(size: int, fraction: float, seed: int, client_id: int) -> list[int]:
    """The positions, within client ``client_id``'s partition, of its held-out evaluation examples
    (seeded by the run's seed and the client; the rest of the partition is its training split)."""
    k = client_eval_count(size, fraction)
    return sorted(rng(seed, "client-eval", client_id).sample(range(size), k)) if k else []


def _partitioners() -> dict[str, type]:
    import flwr_datasets.partitioner as P

    table = {
        "iid": P.IidPartitioner,
        "dirichlet": P.DirichletPartitioner,
        "natural-id": P.NaturalIdPartitioner,
        "shard": P.ShardPartitioner,
        "pathological": P.PathologicalPartitioner,
        "linear": P.LinearPartitioner,
        "square": P.SquarePartitioner,
        "exponential": P.ExponentialPartitioner,
        "inner-dirichlet": P.InnerDirichletPartitioner,
        "size": P.SizePartitioner,
        "id-to-size": P.IdToSizeFncPartitioner,
        "continuous": getattr(P, "ContinuousPartitioner", None),
        "semantic": getattr(P, "SemanticPartitioner", None),
    }
    return {k: v for k, v in table.items() if v is not None}


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    """Build a flwr-datasets partitioner from the config; unknown kwargs name their key."""
    table = _partitioners()
    if cfg.partitioner not in table:
        raise ConfigError(f"data.partitioner: unknown partitioner {cfg.partitioner!r} (known: {', '.join(table)})")
    cls = table[cfg.partitioner]
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "num_partitions" in params:
        kwargs["num_partitions"] = num_partitions
    if "partition_by" in params:
        kwargs["partition_by"] = cfg.partition_by
    if "seed" in params:
        kwargs["seed"] = seed
    if cfg.partitioner == "dirichlet":
        kwargs.update(alpha=1.0, min_partition_size=10, self_balancing=True)
    for key, value in cfg.partitioner_args.items():
        if key not in params:
            raise ConfigError(f"data.partitioner_args.{key}: not an argument of {cls.__name__}"
                              f" (arguments: {', '.join(p for p in params if p != 'self')})")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.partitioner_args: {cls.__name__}: {exc}") from exc


class FederatedData:
    """A corpus split into the server's held-out set and per-client partitions."""

    def __init__(self, cfg: DataConfig, task: str, num_clients: int, seed: int, num_labels: int | None = None):
        self.cfg = cfg
        self.seed = seed
        corpus = load_corpus(cfg, task, num_labels)
        self.train, self.eval = split_corpus(corpus, cfg.eval_size, seed, cfg.eval_stratify)
        self.partitioner = make_partitioner(cfg, num_clients, seed)
        self.partitioner.dataset = self.train
        self.num_clients = num_clients
        n_parts = self.partitioner.num_partitions
        if n_parts != num_clients:
            raise ConfigError(f"federation.num_clients: {num_clients} clients but partitioner"
                              f" {cfg.partitioner!r} over {cfg.partition_by!r} makes {n_parts} partitions")

        self._sizes: list[int] | None = None

    def partition(self, client_id: int) -> Any:
        """Client ``client_id``'s training split: its partition less its held-out examples
        (``data.client_eval_fraction``, :meth:`client_eval`)."""
        full = self._full_partition(client_id)
        held = set(client_eval_indices(len(full), self.cfg.client_eval_fraction, self.seed, client_id))
        return full.select([i for i in range(len(full)) if i not in held]) if held else full

    def client_eval(self, client_id: int) -> Any:
        """Client ``client_id``'s held-out evaluation split (empty when ``data.client_eval_fraction`` is 0)."""
        full = self._full_partition(client_id)
        return full.select(client_eval_indices(len(full), self.cfg.client_eval_fraction, self.seed, client_id))

    def _full_partition(self, client_id: int) -> Any:
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client id {client_id} outside [0, {self.num_clients})")
        try:
            return self.partitioner.load_partition(client_id)
        except ValueError as exc:
            raise ConfigError(f"data.partitioner_args: partitioning failed for {self.cfg.partitioner!r}: {exc}") from exc

    def partition_sizes(self) -> list[int]:
        """Every client's number of training examples, computed once.

        IID shards are contiguous ranges of known length (``Dataset.shard(contiguous=True)``);
        the other partitioners split the whole data set on their first ``load_partition`` and
        keep an index table per partition, whose lengths are read. A partitioner without such a
        table is measured by loading each partition.
        """
        if self._sizes is None:
            frac = self.cfg.client_eval_fraction
            self._sizes = [n - client_eval_count(n, frac) for n in self._compute_sizes()]
        return self._sizes

    def partition_size(self, client_id: int) -> int:
        """Client ``client_id``'s number of training examples (see :meth:`partition_sizes`)."""
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client id {client_id} outside [0, {self.num_clients})")
        return self.partition_sizes()[client_id]

    def empty_partitions(self) -> list[int]:
        """The clients whose partition holds no example (a config the run must refuse)."""
        return [cid for cid, size in enumerate(self.partition_sizes()) if size == 0]

    def _compute_sizes(self) -> list[int]:
        n, k = len(self.train), self.num_clients
        if type(self.partitioner).__name__ == "IidPartitioner":
            div, mod = divmod(n, k)
            return [div + (1 if cid < mod else 0) for cid in range(k)]
        self._full_partition(0)  # the partitioners build their whole index table on the first load
        table = getattr(self.partitioner, "_partition_id_to_indices", None)
        if isinstance(table, dict) and set(table) == set(range(k)):
            return [len(table[cid]) for cid in range(k)]
        return [len(self._full_partition(cid)) for cid in range(k)]


_DATA_CACHE: dict[tuple[Any, ...], FederatedData] = {}


def cached_federated_data(cfg: DataConfig, task: str, num_clients: int, seed: int,
                          num_labels: int | None = None) -> FederatedData:
    """Process-wide cache: the corpus is read and partitioned once per worker."""
    key = (repr(cfg), task, num_clients, seed, num_labels)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = FederatedData(cfg, task, num_clients, seed, num_labels)
    return _DATA_CACHE[key]
