"""What a comparison is judged by, declared in its setting file before any run.

A setting TOML (``simulations/fedspine/*.toml``) carries, beside the experiment, these keys:

- ``baseline``: the method every other one is compared with (required);
- ``target``: the metric value a run must reach (in the metric's direction); ``0`` or absent: set by
  the report after the runs, at the least good method's mean final value (then the table says so);
- ``sustain_k`` (default 3): a target counts as reached at the first evaluation where the running
  mean of the last ``k`` evaluations reaches it;
- ``final_window`` (default 5): a run's final metric is the mean of its last ``final_window`` evaluations;
- ``seeds``: the evaluation seeds; ``tuning_seeds``: the seeds a tuned method (e.g. the best static
  configuration) is chosen on, disjoint from ``seeds``;
- ``margins`` (optional): what a method must show against the baseline: ``speedup_geomean`` (the
  least geometric-mean speed-up), ``speedup_ci_low`` (the least lower end of its 95% CI),
  ``final_metric_loss`` (the largest loss in the final metric, in the metric's units, that the 95%
  CI of the paired difference may reach).

``simulations/reproduce.py`` copies them into every run's ``experiment.json``, where ``fedtune
report`` reads them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.config import ConfigError

__all__ = ["ComparisonSettings", "comparison_settings", "load_comparison_settings", "MARGINS"]

MARGINS = {
    "speedup_geomean": "the least geometric-mean speed-up over the baseline",
    "speedup_ci_low": "the least lower end of the speed-up's 95% CI",
    "final_metric_loss": "the largest loss in final metric (metric units) the paired-difference 95% CI may reach",
}


@dataclass(frozen=True)
class ComparisonSettings:
    baseline: str | None
    target: float | None = None  # None: the report sets it after the runs
    sustain_k: int = 3
    final_window: int = 5
    seeds: tuple[int, ...] = ()
    tuning_seeds: tuple[int, ...] = ()
    margins: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["seeds"], out["tuning_seeds"] = list(self.seeds), list(self.tuning_seeds)
        return out


def _int(source: str, key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{source}: {key}: need an integer >= {least}, got {value!r}")
    return value


def _seeds(source: str, key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise ConfigError(f"{source}: {key}: need a list of integer seeds, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{source}: {key}: a seed is listed twice: {value}")
    return tuple(value)


def comparison_settings(table: Mapping[str, Any], source: str, *, require_baseline: bool = True) -> ComparisonSettings:
    """The comparison keys of a setting's table, checked; errors name ``source`` (the file) and the key."""
    baseline = table.get("baseline")
    if baseline is None and require_baseline:
        raise ConfigError(f"{source}: missing key 'baseline' (the method the others are compared with)")
    if baseline is not None and (not isinstance(baseline, str) or not baseline):
        raise ConfigError(f"{source}: baseline: need a method name, got {baseline!r}")
    target = table.get("target")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ConfigError(f"{source}: target: need a number, got {target!r}")
        target = float(target) or None  # 0: set after the runs
    seeds = _seeds(source, "seeds", table.get("seeds", []))
    tuning = _seeds(source, "tuning_seeds", table.get("tuning_seeds", []))
    both = sorted(set(seeds) & set(tuning))
    if both:
        raise ConfigError(f"{source}: tuning_seeds: must be disjoint from the evaluation seeds; both list {both}")
    margins = table.get("margins", {})
    if not isinstance(margins, Mapping):
        raise ConfigError(f"{source}: margins: need a table, got {margins!r}")
    for k, v in margins.items():
        if k not in MARGINS:
            raise ConfigError(f"{source}: margins: unknown margin {k!r} (known: {', '.join(MARGINS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{source}: margins.{k}: need a number, got {v!r}")
    return ComparisonSettings(
        baseline=baseline, target=target,
        sustain_k=_int(source, "sustain_k", table.get("sustain_k", 3), 1),
        final_window=_int(source, "final_window", table.get("final_window", 5), 1),
        seeds=seeds, tuning_seeds=tuning, margins={k: float(v) for k, v in margins.items()})


def load_comparison_settings(path: Path) -> ComparisonSettings:
    """A setting file's comparison keys; an unreadable file or a missing baseline is an error naming it."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the setting: {exc}") from None
    return comparison_settings(table, str(path))
