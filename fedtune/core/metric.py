"""The run's quality metric: its name, which way is better, and when a target is reached."""

from __future__ import annotations

from typing import Any

__all__ = ["time_to_target"]


def time_to_target(records: list[dict[str, Any]], target: float, metric: str = "eval_accuracy") -> float | None:
    """Simulated seconds until ``metric`` first reaches ``target`` (None if it never does); a
    perplexity or loss reaches it from above (lower is better), anything else from below."""
    lower_better = "perplexity" in metric or metric.endswith("loss")
    for rec in records:
        value = rec.get(metric)
        if value is not None and (value <= target if lower_better else value >= target):
            return float(rec.get("sim_time_s", 0.0))
    return None
