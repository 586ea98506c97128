"""Statistics of a paired-seed comparison: sustained time to target, censoring, speed-ups and CIs.

Pure functions on plain numbers (numpy only), used by ``fedtune report``:

- :func:`sustained_time`: the simulated time of the first evaluation at which the running mean of
  the last ``k`` evaluations reaches the target (one lucky evaluation does not count); a run that
  never gets there is *censored*: it counts at its horizon (its last simulated time), a lower bound
  of its true time, and is never dropped.
- :func:`paired_speedups`: runs are paired by seed (for a seed, every method sees the same client
  sampling, data split and device draws); per seed, speed-up = baseline time / method time (> 1:
  faster than the baseline); the geometric mean over the paired seeds with a percentile bootstrap
  95% CI (seeds resampled with replacement, a fixed RNG seed, so a report is reproducible). A seed
  run by only one of the two methods is left out of the pairing and named in ``unpaired_seeds``.
  Censoring biases the ratio one way: a censored method time makes that seed's speed-up an upper
  bound of the true one, a censored baseline time a lower bound; :func:`censoring_bias` says which
  holds for the geometric mean.
- :func:`final_value`: the mean of a run's last ``window`` evaluations;
  :func:`paired_difference`: method - baseline per seed, its mean and bootstrap 95% CI.
- :func:`binomial_se`: the standard error of an accuracy measured on ``n`` held-out examples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "N_RESAMPLES",
    "RNG_SEED",
    "TimeToTarget",
    "binomial_se",
    "bootstrap_ci",
    "censoring_bias",
    "final_value",
    "geomean",
    "mean_band",
    "paired_difference",
    "paired_speedups",
    "sustained_time",
    "t_interval",
    "t_quantile_975",
]

N_RESAMPLES = 10_000
RNG_SEED = 0


@dataclass(frozen=True)
class TimeToTarget:
    """A run's sustained time to target; ``censored``: never reached, ``time_s`` is the horizon."""

    time_s: float
    censored: bool


def sustained_time(times: Sequence[float], values: Sequence[float], target: float, k: int = 3,
                   higher_is_better: bool = True, horizon: float | None = None) -> TimeToTarget:
    """The time of the first evaluation ``i`` (``i >= k - 1``) whose mean of ``values[i-k+1 : i+1]``
    reaches ``target`` (``>=`` when higher is better, else ``<=``). Never reached: censored at
    ``horizon`` (default: the last evaluation's time)."""
    if k < 1:
        raise ValueError(f"sustain_k: must be >= 1, got {k}")
    if len(times) != len(values):
        raise ValueError(f"{len(times)} times for {len(values)} values")
    vals = np.asarray(values, dtype=float)
    if len(vals) >= k:
        running = np.convolve(vals, np.ones(k) / k, mode="valid")  # running[j]: evaluations j .. j+k-1
        hit = running >= target if higher_is_better else running <= target
        idx = np.flatnonzero(hit)
        if idx.size:
            return TimeToTarget(float(times[int(idx[0]) + k - 1]), False)
    end = horizon if horizon is not None else (float(times[-1]) if len(times) else 0.0)
    return TimeToTarget(float(end), True)


def final_value(values: Sequence[float], window: int = 5) -> float | None:
    """The mean of the last ``window`` values (all of them when fewer); None without values."""
    if window < 1:
        raise ValueError(f"final_window: must be >= 1, got {window}")
    if not len(values):
        return None
    return float(np.mean(np.asarray(values[-window:], dtype=float)))


def geomean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(values, dtype=float)))))


def bootstrap_ci(samples: Sequence[float], statistic: Callable[[np.ndarray], np.ndarray] | None = None, *,
                 n_resamples: int = N_RESAMPLES, seed: int = RNG_SEED, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over ``samples``, resampled
    with replacement ``n_resamples`` times from ``numpy.random.default_rng(seed)``; ``statistic``
    maps a (resamples, n) array to (resamples,). None for fewer than two samples (no interval)."""
    x = np.asarray(samples, dtype=float)
    if x.size < 2:
        return None
    stat = statistic or (lambda a: a.mean(axis=1))
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    boots = stat(x[idx])
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def censoring_bias(method_censored: Sequence[bool], baseline_censored: Sequence[bool]) -> str:
    """Which way censoring biases a geometric-mean speed-up over paired seeds:

    - ``"none"``: no seed censored, the ratio is measured;
    - ``"upper_bound"``: only the method was censored (on some seeds): the true speed-up is at most this;
    - ``"lower_bound"``: only the baseline was censored: the true speed-up is at least this;
    - ``"mixed"``: both ways, or both methods censored on a seed: neither bound holds.
    """
    up = any(m and not b for m, b in zip(method_censored, baseline_censored))
    low = any(b and not m for m, b in zip(method_censored, baseline_censored))
    both = any(m and b for m, b in zip(method_censored, baseline_censored))
    if both or (up and low):
        return "mixed"
    return "upper_bound" if up else "lower_bound" if low else "none"


def _pair(method: Mapping[int, object], baseline: Mapping[int, object]) -> tuple[list[int], list[int]]:
    seeds = sorted(set(method) & set(baseline))
    return seeds, sorted(set(method) ^ set(baseline))


def paired_speedups(method: Mapping[int, TimeToTarget], baseline: Mapping[int, TimeToTarget], *,
                    n_resamples: int = N_RESAMPLES, seed: int = RNG_SEED) -> dict[str, object]:
    """Per-seed speed-ups ``baseline.time_s / method.time_s`` over the seeds both have, their geometric
    mean, the bootstrap 95% CI of the geometric mean (None with one seed) and the censoring bias.
    ``unpaired_seeds``: seeds only one of the two ran (left out)."""
    seeds, unpaired = _pair(method, baseline)
    ratios = [baseline[s].time_s / method[s].time_s if method[s].time_s > 0 else math.inf for s in seeds]
    finite = all(math.isfinite(r) and r > 0 for r in ratios)
    gm = geomean(ratios) if ratios and finite else None
    ci = None
    if gm is not None:
        logs = np.log(np.asarray(ratios))
        low_high = bootstrap_ci(logs, n_resamples=n_resamples, seed=seed)
        ci = [float(np.exp(v)) for v in low_high] if low_high else None
    return {
        "seeds": seeds, "unpaired_seeds": unpaired, "per_seed": dict(zip(seeds, ratios)),
        "geomean": gm, "ci95": ci,
        "bias": censoring_bias([method[s].censored for s in seeds], [baseline[s].censored for s in seeds]),
    }


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float], *,
                      n_resamples: int = N_RESAMPLES, seed: int = RNG_SEED) -> dict[str, object]:
    """Per-seed ``method - baseline`` over the seeds both have (values that are None are left out),
    their mean and bootstrap 95% CI (None with one seed)."""
    m = {s: v for s, v in method.items() if v is not None}
    b = {s: v for s, v in baseline.items() if v is not None}
    seeds, unpaired = _pair(m, b)
    diffs = [m[s] - b[s] for s in seeds]
    return {"seeds": seeds, "unpaired_seeds": unpaired, "per_seed": dict(zip(seeds, diffs)),
            "mean": float(np.mean(diffs)) if diffs else None,
            "ci95": bootstrap_ci(diffs, n_resamples=n_resamples, seed=seed)}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` examples: sqrt(p (1 - p) / n)."""
    if n < 1:
        raise ValueError(f"eval set size must be >= 1, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


# Student's t, two-sided 95% (the 0.975 quantile), for 1-30 degrees of freedom; above that 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (normal beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def t_interval(xs: Sequence[float]) -> list[float] | None:
    """95% Student-t interval of the mean of ``xs`` (rounded to 4 places); None with fewer than two."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    half = t_quantile_975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return [round(m - half, 4), round(m + half, 4)]


def mean_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], points: int = 100
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Curves ``(times, values)`` (one per seed) linearly interpolated onto a common time grid, from
    the latest first time to the earliest last time (where every curve has data): the grid, the
    mean, and the t-based 95% CI band of the mean across curves (None, None for one curve)."""
    curves = [(np.asarray(t, dtype=float), np.asarray(v, dtype=float)) for t, v in curves if len(t)]
    if not curves:
        raise ValueError("no curves")
    start = max(float(t[0]) for t, _ in curves)
    end = min(float(t[-1]) for t, _ in curves)
    grid = np.linspace(start, end, points) if end > start else np.asarray([start])
    ys = np.stack([np.interp(grid, t, v) for t, v in curves])
    mean = ys.mean(axis=0)
    if len(curves) < 2:
        return grid, mean, None, None
    half = t_quantile_975(len(curves) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(curves))
    return grid, mean, mean - half, mean + half
