"""Compressed adapter transport: bytes on the wire and accuracy, against fp32, on paired seeds.

Runs an experiment (default: the default experiment, shortened with ``--rounds``) once per
codec and seed on Flower's Ray simulation engine, every codec of a seed with the same
sampling, data and initialisation, and reads each run's ``metrics.jsonl`` and
``summary.json``:

- ``bytes_ratio_vs_fp32_own_rank``: the encoded bytes a client sent (``bytes_up``, summed over
  the run) over what the same replies weigh in fp32 at the same ranks (the fp32 run's);
- ``bytes_ratio_vs_fp32_rank_max``: the mean encoded reply of an accepted client-round over
  the fp32 reply of a client at the largest rank (an fp32 record of that rank's shapes, counted
  as Flower counts it);
- ``accuracy_diff``: the final held-out accuracy (mean of the last ``--final-window``
  evaluations) of the codec minus fp32's, per seed, with the mean and a t-interval.

    .venv/bin/python simulations/bench/compression.py --seeds 0 1 2 --rounds 6 \\
        [--config simulations/default.toml] [--out simulations/results/compression.json] [--runs-dir DIR]

``--setting simulations/fedspine/previous/minilm-s30.toml --method fedspine`` runs that comparison
setting's method instead (its experiment as ``simulations/reproduce.py`` builds it: the
80-device fleet, the S-UCB bandit, pruning); the output then goes under the setting's name in
the same file (``settings``), beside the experiment given with ``--config``.
"""

from __future__ import annotations

import argparse
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

from fedtune.reporting.stats import t_interval

CODECS = ("fp32", "fp16", "int8")


def run(config: Path, codec: str, seed: int, rounds: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One run; returns its per-round records and summary."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/ftc")}
    sets = [f"seed={seed}", f"federation.num_rounds={rounds}", f'federation.transport_up="{codec}"',
            f'federation.transport_down="{codec}"', *extra]
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--config", str(config), "--out", str(out), "--force"]
    for s in sets:
        cmd += ["--set", s]
    if (out / "summary.json").is_file() and (out / "config.toml").is_file():  # a finished run of --runs-dir
        from fedtune.core.config import load_config

        done = load_config(out / "config.toml")
        if (done.seed, done.federation.num_rounds, done.federation.transport_up) == (seed, rounds, codec):
            from fedtune.round.outputs import read_metrics

            return {"records": read_metrics(out / "metrics.jsonl"),
                    "summary": json.loads((out / "summary.json").read_text()), "wall_s": None}
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{codec} seed {seed} failed:\n{proc.stderr[-3000:]}")
    from fedtune.round.outputs import read_metrics

    return {"records": read_metrics(out / "metrics.jsonl"), "summary": json.loads((out / "summary.json").read_text()),
            "wall_s": round(time.time() - t0, 1)}


def client_rounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for r in records for c in r.get("clients", []) if c.get("status") == "ok"]


def final_metric(records: list[dict[str, Any]], key: str, window: int) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values[-window:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "simulations/default.toml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--final-window", type=int, default=2)
    p.add_argument("--codecs", nargs="+", default=list(CODECS))
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides")
    p.add_argument("--setting", type=Path, help="a comparison setting (simulations/fedspine/*.toml) instead of --config")
    p.add_argument("--method", default="fedspine", help="the setting's method to run (with --setting)")
    p.add_argument("--out", type=Path, default=ROOT / "simulations/results/compression.json")
    p.add_argument("--runs-dir", type=Path, help="keep the runs here (CODEC-SEED/); a finished one is read, not rerun")
    args = p.parse_args()
    from fedtune.core.config import config_to_toml, load_config

    if args.setting is not None:
        from simulations.reproduce import load_setting, method_config

        setting = load_setting(args.setting)
        if args.method not in setting["methods"] or args.method == "best-static":
            p.error(f"--method: {args.method!r} is not a method of {args.setting} that runs as it is"
                    f" (choose from {', '.join(m for m in setting['methods'] if m != 'best-static')})")
        tmp_cfg = Path(tempfile.mkdtemp(prefix="ftc-cfg-")) / f"{setting['setting']}.{args.method}.toml"
        from fedtune.core.config import config_from_dict

        tmp_cfg.write_text(config_to_toml(config_from_dict(method_config(setting, args.method, 0))))
        source, args.config = f"{args.setting.resolve().relative_to(ROOT)} method {args.method}", tmp_cfg
    else:
        source = str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config)
    cfg = load_config(args.config, args.extra)
    metric = "eval_accuracy" if cfg.model.task == "classification" else "eval_loss"
    results: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in args.codecs}
    with tempfile.TemporaryDirectory(prefix="ftc-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        for seed in args.seeds:
            for codec in args.codecs:
                res = run(args.config, codec, seed, args.rounds, runs_dir / f"{codec}-{seed}", args.extra)
                results[codec][seed] = res
                print(f"[compression] seed {seed} {codec}: {metric} {final_metric(res['records'], metric, args.final_window):.4f},"
                      f" bytes_up {sum(r.get('bytes_up', 0) for r in res['records'])}, {res['wall_s']}s", flush=True)
    base = results["fp32"]
    fp32_max = fp32_reply_bytes(cfg, cfg.lora.max_rank)
    out: dict[str, Any] = {
        "command": "python simulations/bench/compression.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "config": source, "fp32_reply_bytes_rank_max": fp32_max, "rounds": args.rounds, "seeds": args.seeds, "metric": metric, "final_window": args.final_window, "codecs": {}}
    for codec in args.codecs:
        own, vs_max, diffs = [], [], []
        for seed in args.seeds:
            recs, ref = results[codec][seed]["records"], base[seed]["records"]
            up = sum(r.get("bytes_up", 0) for r in recs)
            up_ref = sum(r.get("bytes_up", 0) for r in ref)
            own.append(up / up_ref if up_ref else math.nan)
            n_ok = len(client_rounds(recs))
            vs_max.append(up / n_ok / fp32_max if n_ok and fp32_max else math.nan)
            diffs.append(final_metric(recs, metric, args.final_window) - final_metric(ref, metric, args.final_window))
        out["codecs"][codec] = {
            "bytes_ratio_vs_fp32_own_rank": round(statistics.fmean(own), 4),
            "bytes_ratio_vs_fp32_rank_max": round(statistics.fmean(vs_max), 4),
            "accuracy_diff": round(statistics.fmean(diffs), 4), "accuracy_diff_per_seed": [round(d, 4) for d in diffs],
            "accuracy_diff_ci95": t_interval(diffs),
            f"final_{metric}": [round(final_metric(results[codec][s]["records"], metric, args.final_window), 4)
                                for s in args.seeds],
        }
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.setting is not None:  # beside what the file already holds
        prev.setdefault("settings", {})[setting["setting"]] = out
        out = prev
    elif "settings" in prev:
        out["settings"] = prev["settings"]
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out.get("codecs", out.get("settings")), indent=1))
    print(f"wrote {args.out}")


def fp32_reply_bytes(cfg: Any, rank: int) -> int:
    """What a rank-``rank`` reply weighs in fp32 as Flower counts it (an encoded record of zeros)."""
    import torch

    from fedtune.lora.transport import encode
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import head_state, lora_shapes
    from strategies.replies import ReplyDecoder

    base = cached_base_model(cfg.model, cfg.seed)
    decoder = ReplyDecoder(lora_shapes(base, cfg), {k: tuple(v.shape) for k, v in head_state(base).items()})
    return encode({k: torch.zeros(shape) for k, shape in decoder.base_arrays(rank).items()}, "fp32").count_bytes()


if __name__ == "__main__":
    main()
