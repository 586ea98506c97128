"""The run's quality metric: its name, which way is better, and when a target is reached.

A classification run is judged by held-out accuracy (higher is better), a causal-LM run by
held-out perplexity (lower is better). Every place that needs to know asks this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Metric", "ACCURACY", "PERPLEXITY", "metric_for_task", "metric_of_records", "metric_named", "masked",
           "reported_metric", "time_to_target"]


@dataclass(frozen=True)
class Metric:
    key: str  # the metrics.jsonl key, e.g. "eval_accuracy"
    short: str  # its name in tables and plots, e.g. "accuracy"
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def reaches(self, value: float, target: float) -> bool:
        """Whether ``value`` is at least as good as ``target``."""
        return value >= target if self.higher_is_better else value <= target

    def best(self, values: list[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    @property
    def slug(self) -> str:
        """The key without ``eval_``: ``accuracy``, ``perplexity``, ``masked_accuracy``, ..."""
        return self.key.replace("eval_", "")

    @property
    def comparator(self) -> str:
        return ">=" if self.higher_is_better else "<="


ACCURACY = Metric("eval_accuracy", "accuracy", True)
PERPLEXITY = Metric("eval_perplexity", "perplexity", False)
LOSS = Metric("eval_loss", "loss", False)
_BY_KEY = {m.key: m for m in (ACCURACY, PERPLEXITY, LOSS)}


def metric_for_task(task: str) -> Metric:
    """Accuracy for ``classification``, perplexity for ``causal-lm``."""
    return ACCURACY if task == "classification" else PERPLEXITY


MASKED_PREFIX = "masked_"


def masked(metric: Metric) -> Metric:
    """The same metric of the global adapter under devices' pruning masks (what deployed models see)."""
    return Metric(MASKED_PREFIX + metric.key, f"{metric.short} (pruned)", metric.higher_is_better)


def metric_named(key: str) -> Metric:
    """The metric of a metrics.jsonl key; raises ValueError naming an unknown one."""
    if key.startswith(MASKED_PREFIX):
        return masked(metric_named(key.removeprefix(MASKED_PREFIX)))
    if key not in _BY_KEY:
        raise ValueError(f"unknown metric {key!r} (known: {', '.join(sorted(_BY_KEY))})")
    return _BY_KEY[key]


def metric_of_records(records: list[dict[str, Any]]) -> Metric:
    """The metric a run's records carry: accuracy when any record has it, else perplexity."""
    return ACCURACY if any(r.get(ACCURACY.key) is not None for r in records) else PERPLEXITY


def reported_metric(records: list[dict[str, Any]], prefer_masked: bool = True) -> Metric:
    """The metric a comparison reads: the masked one when the run recorded it (and it is preferred),
    else the unmasked one."""
    m = metric_of_records(records)
    mm = masked(m)
    return mm if prefer_masked and any(r.get(mm.key) is not None for r in records) else m


def time_to_target(records: list[dict[str, Any]], target: float, metric: str = ACCURACY.key) -> float | None:
    """Simulated seconds until ``metric`` first reaches ``target`` (None if it never does)."""
    m = metric_named(metric)
    for rec in records:
        value = rec.get(metric)
        if value is not None and m.reaches(value, target):
            return float(rec.get("sim_time_s", 0.0))
    return None
