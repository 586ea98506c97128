"""Round-to-round stability of the held-out accuracy: server optimizers, client schedules, batch size.

Runs an experiment (default: the default experiment) once per variant and seed on Flower's Ray
simulation engine; the variants of a seed share sampling, data and initialisation (paired seeds).
From each run's ``metrics.jsonl`` it reports, per variant:

- ``eval_accuracy``: the held-out accuracy of every evaluated round, per seed;
- ``mean_abs_change``: the mean absolute change between consecutive evaluations after round
  ``--settle`` (default 3), and ``change_over_se``, its ratio to the eval set's standard error
  ``sqrt(p (1 - p) / n)`` (p: the run's mean accuracy over those rounds, n: ``data.eval_size``);
  a ratio near 1 is a swing the size of one standard error of the measurement;
- ``final_accuracy``: the mean of the last ``--final-window`` (3) evaluations, and
  ``final_diff_vs_baseline``: its paired difference against ``baseline`` per seed, with the mean
  and a 95% t-interval.

    .venv/bin/python simulations/bench/stability.py --seeds 0 1 2 [--rounds 10] \\
        [--variants baseline avgm adam-1e-2 cosine-clip batch-32] [--runs-dir DIR] \\
        [--config simulations/default.toml] [--out simulations/results/stability.json]

Beside ``--out`` (a JSON file) it draws ``--out`` with ``.png``: held-out accuracy against round, one panel
per seed, one line per variant with a band of one standard error of the eval set.

With ``--runs-dir``, runs go to ``DIR/VARIANT-SEED/`` and a finished run whose config matches
is read instead of run again.

``--define NAME=OVERRIDE`` adds a variant of this invocation (repeat it for several overrides of one
variant), for A/B runs on another experiment, e.g. a comparison setting's static run without pruning::

    .venv/bin/python simulations/bench/stability.py --config RUN/experiment.toml --seeds 100 101 \\
        --rounds 8 --settle 3 --final-window 5 --variants baseline lr-1e-3 no-prune \\
        --define 'no-prune=policy.args.arms={jetson-tx2=[0.0,16],jetson-xavier-nx=[0.0,16],jetson-agx-xavier=[0.0,16]}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fedtune.reporting.stats import binomial_se, t_interval

# variant name -> config overrides (``--set`` values) on top of the experiment
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "avgm": ['federation.server_optimizer="avgm"', "federation.server_momentum=0.9", "federation.server_lr=1.0"],
    "avgm-0.5": ['federation.server_optimizer="avgm"', "federation.server_momentum=0.5", "federation.server_lr=0.5"],
    "adam-1e-2": ['federation.server_optimizer="adam"', "federation.server_lr=0.01"],
    "adam-3e-3": ['federation.server_optimizer="adam"', "federation.server_lr=0.003"],
    "yogi-1e-2": ['federation.server_optimizer="yogi"', "federation.server_lr=0.01"],
    "cosine-clip": ['train.lr_schedule="cosine"', "train.warmup_steps=2", "train.max_grad_norm=1.0"],
    "batch-32": ["train.batch_size=32"],
    "steps-10": ["train.local_steps=10"],
    "lr-1e-3": ["train.learning_rate=0.001"],
    "no-logit-adj": ["train.logit_adjustment=0.0"],
    "adam-eps-1e-6": ["train.adam_eps=1e-6"],
    "adam-eps-1e-5": ["train.adam_eps=1e-5"],
    "adam-eps-1e-4": ["train.adam_eps=1e-4"],
}
DEFAULT_VARIANTS = ["baseline", "avgm", "adam-1e-2", "cosine-clip", "batch-32"]


def run(config: Path, sets: list[str], out: Path) -> tuple[list[dict[str, Any]], float | None]:
    """One run (or the finished one already in ``out`` with the same config): its records and wall seconds."""
    from fedtune.core.config import load_config
    from fedtune.round.checkpoint import config_hash
    from fedtune.round.outputs import read_metrics

    wanted = load_config(config, sets)
    if (out / "summary.json").is_file() and (out / "config.toml").is_file():
        done = load_config(out / "config.toml")
        if config_hash(done) == config_hash(wanted) and done.federation.num_rounds == wanted.federation.num_rounds:
            return read_metrics(out / "metrics.jsonl"), None
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/fts")}
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--config", str(config), "--out", str(out), "--force"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {out.name} failed:\n{proc.stderr[-3000:]}")
    return read_metrics(out / "metrics.jsonl"), round(time.time() - t0, 1)


def accuracy_by_round(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(r["round"]), float(r["eval_accuracy"])) for r in records if r.get("eval_accuracy") is not None]


def stability(curve: list[tuple[int, float]], settle: int, n_eval: int) -> dict[str, float]:
    """Mean absolute change between consecutive evaluations after round ``settle``, and its ratio to
    the standard error of an accuracy p measured on ``n_eval`` examples."""
    late = [(r, a) for r, a in curve if r >= settle]
    changes = [abs(b - a) for (_, a), (_, b) in itertools.pairwise(late)]
    if not changes:
        return {"mean_abs_change": math.nan, "change_over_se": math.nan}
    p = statistics.fmean(a for _, a in late)
    se = binomial_se(p, n_eval)
    mean = statistics.fmean(changes)
    return {"mean_abs_change": mean, "change_over_se": mean / se if se > 0 else math.nan}


def summarise(curves: dict[int, list[tuple[int, float]]], base: dict[int, list[tuple[int, float]]] | None,
              settle: int, window: int, n_eval: int) -> dict[str, Any]:
    """One variant's figures over its seeds (``base``: the baseline's curves, for paired differences)."""
    seeds = sorted(curves)
    stab = [stability(curves[s], settle, n_eval) for s in seeds]
    final = [statistics.fmean(a for _, a in curves[s][-window:]) for s in seeds]
    row: dict[str, Any] = {
        "eval_accuracy": {str(s): [[r, round(a, 4)] for r, a in curves[s]] for s in seeds},
        "mean_abs_change": round(statistics.fmean(x["mean_abs_change"] for x in stab), 4),
        "mean_abs_change_per_seed": [round(x["mean_abs_change"], 4) for x in stab],
        "change_over_se": round(statistics.fmean(x["change_over_se"] for x in stab), 3),
        "final_accuracy": round(statistics.fmean(final), 4),
        "final_accuracy_per_seed": [round(x, 4) for x in final],
    }
    if base is not None:
        diffs = [f - statistics.fmean(a for _, a in base[s][-window:]) for f, s in zip(final, seeds)]
        row.update({"final_diff_vs_baseline": round(statistics.fmean(diffs), 4),
                    "final_diff_per_seed": [round(d, 4) for d in diffs], "final_diff_ci95": t_interval(diffs)})
    return row


def plot(out: dict[str, Any], path: Path) -> None:
    """Held-out accuracy against round, one panel per seed, one line per variant, with the band of one
    standard error of the eval set around each point (what a swing has to exceed to be more than noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = [str(s) for s in out["seeds"]]
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 3.8), squeeze=False, sharey=True)
    for ax, seed in zip(axes[0], seeds):
        for v, row in out["variants"].items():
            pts = row["eval_accuracy"][seed]
            r = [x for x, _ in pts]
            a = [y for _, y in pts]
            se = [binomial_se(y, out["eval_size"]) for y in a]
            line, = ax.plot(r, a, marker="o", ms=3, label=v)
            ax.fill_between(r, [y - s for y, s in zip(a, se)], [y + s for y, s in zip(a, se)],
                            color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"held-out accuracy (n={out['eval_size']}; band: 1 SE)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{out.get('title') or out['config']}: round-to-round stability by variant", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "simulations/default.toml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help=f"variants to run, of {', '.join(sorted(VARIANTS))} and those --define adds (baseline is"
                   " always run: the paired differences need it)")
    p.add_argument("--define", action="append", default=[], metavar="NAME=OVERRIDE",
                   help="a variant NAME with the config override OVERRIDE (repeat for more overrides of NAME)")
    p.add_argument("--settle", type=int, default=3, help="round after which round-to-round changes count")
    p.add_argument("--final-window", type=int, default=3, help="evaluations averaged into the final accuracy")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides for every variant")
    p.add_argument("--title", default="", help="the plot's title (default: the config's path)")
    p.add_argument("--out", type=Path, default=ROOT / "simulations/results/stability.json")
    p.add_argument("--runs-dir", type=Path, help="keep the runs here (VARIANT-SEED/); a finished one is read, not rerun")
    args = p.parse_args()
    try:
        args.variant_sets = variant_table(args.define)
    except ValueError as e:
        p.error(str(e))
    unknown = [v for v in args.variants if v not in args.variant_sets]
    if unknown:
        p.error(f"--variants: unknown {', '.join(map(repr, unknown))}; known: {', '.join(sorted(args.variant_sets))}")
    return args


def variant_table(defines: list[str]) -> dict[str, list[str]]:
    """The built-in variants plus those ``--define NAME=OVERRIDE`` adds (an override is a ``--set`` value)."""
    table = {k: list(v) for k, v in VARIANTS.items()}
    added: dict[str, list[str]] = {}
    for d in defines:
        name, sep, override = d.partition("=")
        name = name.strip()
        if not sep or not name or "=" not in override:
            raise ValueError(f"--define {d!r}: expected NAME=KEY=VALUE, e.g. no-prune=prune.ratio=0.0")
        if name in VARIANTS:
            raise ValueError(f"--define {name!r}: a built-in variant of that name exists")
        added.setdefault(name, []).append(override)
    return {**table, **added}


def main() -> None:
    args = parse_args()
    from fedtune.core.config import load_config

    variants = ["baseline", *[v for v in args.variants if v != "baseline"]]
    cfg = load_config(args.config, args.extra)
    if cfg.model.task != "classification":
        raise SystemExit(f"{args.config}: stability is measured on held-out accuracy (a classification task)")
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {v: {} for v in variants}
    walls: dict[str, list[float | None]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="fts-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        for seed in args.seeds:
            for v in variants:
                sets = [f"seed={seed}", f"federation.num_rounds={args.rounds}", *args.extra, *args.variant_sets[v]]
                records, wall = run(args.config, sets, runs_dir / f"{v}-{seed}")
                curves[v][seed] = accuracy_by_round(records)
                walls[v].append(wall)
                print(f"[stability] seed {seed} {v}: {[round(a, 3) for _, a in curves[v][seed]]} ({wall}s)", flush=True)
    source = str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config)
    out: dict[str, Any] = {
        "command": "python simulations/bench/stability.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "config": source, "title": args.title, "rounds": args.rounds, "seeds": args.seeds, "eval_size": cfg.data.eval_size,
        "settle": args.settle, "final_window": args.final_window,
        "variants": {v: {"overrides": args.variant_sets[v], "wall_s": walls[v],
                         **summarise(curves[v], None if v == "baseline" else curves["baseline"], args.settle,
                                     args.final_window, cfg.data.eval_size)}
                     for v in variants},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.out.with_suffix(".png"))
    for v, row in out["variants"].items():
        print(f"{v:12s} change {row['mean_abs_change']:.4f} ({row['change_over_se']:.2f} SE)  final "
              f"{row['final_accuracy']:.4f}  diff {row.get('final_diff_vs_baseline', 0.0):+.4f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
