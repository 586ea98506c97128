"""``fedtune`` command line: ``fedtune simulate [--config PATH] [--set KEY=VALUE ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedtune.config import ConfigError, ExperimentConfig, config_to_toml, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated LoRA fine-tuning on Flower + Ray")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="experiment TOML (default: the built-in default experiment)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set federation.num_rounds=5 (repeatable)")
        sp.add_argument("--strategy", help="aggregation strategy: registry name, module:Class or file.py:Class")
        sp.add_argument("--policy", help="bandit policy of the fedspine strategy: name, module:Class or file.py:Class")

    sim = sub.add_parser("simulate", help="run an experiment on Flower's simulation engine (Ray)")
    common(sim)
    sim.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<timestamp>)")
    sim.add_argument("--resume", action="store_true", help="resume from the run directory's checkpoint")
    sim.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")

    show = sub.add_parser("config", help="print the resolved config after overrides")
    common(show)
    sub.add_parser("strategies", help="list registered strategies")
    return p


def _load(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"federation.strategy={json.dumps(args.strategy)}")
    if args.policy:
        overrides.append(f"policy.name={json.dumps(args.policy)}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "strategies":
            from strategies.registry import STRATEGIES

            for name, cls in sorted(STRATEGIES.items()):
                doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
                print(f"{name:10s} {doc[0] if doc else ''}")
            return 0
        cfg = _load(args)
        if args.command == "config":
            print(config_to_toml(cfg), end="")
            return 0
        from fedtune.simulation import prepare_environment, preflight, simulate

        prepare_environment(cfg, args.verbose)

        out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.resume and not (out / "checkpoint" / "meta.json").is_file():
            raise ConfigError(f"--resume: no checkpoint in {out}")
        preflight(cfg)
        summary = simulate(cfg, out, resume=args.resume, verbose=args.verbose)
    except ConfigError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    metric = summary["metric"]
    print(f"[fedtune] {metric}: {summary[f'initial_{metric}']:.4f} (round 0) -> {summary[f'final_{metric}']:.4f}"
          f" (round {summary['rounds']}); outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
