"""``fedtune`` command line: ``fedtune simulate [--config PATH] [--set KEY=VALUE ...] [--out DIR]``.

Exit status: 0 when the command did its work; 1 when a run failed; 2 for bad input, reported on one
line that names the key or argument (an unknown or invalid config key, a file that is missing or not
UTF-8 TOML, a run directory that is in use, a Ray cluster in ``simulation.ray_address`` that does
not answer); 128 + N when signal N stopped a ``simulate`` run (143 for SIGTERM, 130 for SIGINT),
after one line that names the last checkpointed round.

Progress goes through :mod:`logging` (``fedtune.tracking``): ``[fedtune] ...`` lines on stdout
(warnings on stderr) at INFO, or WARNING with ``fedtune --quiet``, DEBUG with ``fedtune --verbose``;
``simulate`` and ``deploy`` also write every line, DEBUG included, to ``<run>/run.log``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fedtune.core.config import (
    ConfigError,
    ExperimentConfig,
    config_to_toml,
    load_config,
)
from fedtune.tracking import configure_logging, run_log, tracker_classes

__all__ = ["main"]

LOG = logging.getLogger("fedtune.cli")

FORCE_HELP = "overwrite a non-empty --out, or resume with a changed config"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtune")
    except PackageNotFoundError:
        import fedtune

        return str(getattr(fedtune, "__version__", "unknown"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated LoRA fine-tuning on Flower + Ray")
    p.add_argument("--version", action="version", version=f"fedtune {_version()}")
    level = p.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    level.add_argument("-v", "--verbose", dest="log_verbose", action="store_true",
                       help="show DEBUG lines too (each client of each round), and Flower's and Ray's logs")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="experiment TOML (default: simulations/default.toml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set federation.num_rounds=5 (repeatable)")
        sp.add_argument("--strategy", help="aggregation strategy: registry name, module:Class or file.py:Class")
        sp.add_argument("--policy", help="bandit policy of the fedspine strategy: name, module:Class or file.py:Class")

    sim = sub.add_parser("simulate", help="run an experiment on Flower's simulation engine (Ray)")
    common(sim)
    sim.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<timestamp>)")
    sim.add_argument("--resume", action="store_true", help="resume from the run directory's checkpoint")
    sim.add_argument("--force", action="store_true", help=FORCE_HELP)
    sim.add_argument("--verbose", action="store_true", help="the same as `fedtune --verbose simulate`")

    dep = sub.add_parser("deploy", help="run an experiment on a local Flower deployment: a SuperLink and"
                                        " SuperNodes as processes on 127.0.0.1 (TLS and SuperNode auth on)")
    common(dep)
    dep.add_argument("--nodes", type=int, help="number of SuperNodes (default: federation.num_clients)")
    dep.add_argument("--out", type=Path, help="run directory (default: runs/<name>-deploy-<timestamp>)")
    dep.add_argument("--work-dir", type=Path, help="state, logs and the flwr connection (default: <out>/deployment);"
                     " certificates and keys live in a private temporary directory removed at the end")
    dep.add_argument("--insecure", action="store_true", help="no TLS (only for trying things on one machine)")
    dep.add_argument("--no-auth", action="store_true", help="admit any SuperNode (no registration)")
    dep.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    dep.add_argument("--force", action="store_true", help=FORCE_HELP)
    dep.add_argument("--no-worker", action="store_true",
                     help="train in Flower's per-message ClientApp processes (no persistent worker per node)")

    certs = sub.add_parser("certs", help="generate a CA, a SuperLink certificate and SuperNode auth keys")
    certs.add_argument("out", type=Path, help="directory to write them to (kept out of git)")
    certs.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to generate")
    certs.add_argument("--host", action="append", default=[], help="extra host name or IP of the SuperLink")

    comp = sub.add_parser("compose", help="write docker-compose.yml (TLS + SuperNode auth) and insecure.yml for N SuperNodes")
    comp.add_argument("--config", type=Path, help="experiment TOML whose fleet gives each node's device class")
    comp.add_argument("--nodes", type=int, default=3)
    comp.add_argument("--dir", type=Path, default=Path("."), help="where to write the two files")

    rep = sub.add_parser("report", help="compare runs: PNG plots, a markdown table and summary.json")
    rep.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                     help="run directories, or folders searched for runs (e.g. runs/fedspine/minilm-s30)")
    rep.add_argument("--out", type=Path, help="output folder (default: <first RUN_DIR>/report)")
    rep.add_argument("--unmasked", action="store_true",
                     help="measure time to target on the unpruned global adapter instead of under devices' masks")
    rep.add_argument("--target", type=float, help="target metric (default: each run's experiment.json, else"
                                                   " the least good method's mean final value)")

    show = sub.add_parser("config", help="check the experiment as `simulate` does before it starts (strategy,"
                                          " data set, model, LoRA targets, fleet) and print the resolved config")
    common(show)
    show.add_argument("--explain", action="store_true",
                      help="list every config key with its type, built-in default and description instead")
    show.add_argument("--format", choices=("text", "markdown"), default="text",
                      help="--explain output: a text table, or markdown (docs/config.md)")
    sub.add_parser("strategies", help="list registered strategies")
    return p


def _load(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"federation.strategy={json.dumps(args.strategy)}")
    if args.policy:
        overrides.append(f"policy.name={json.dumps(args.policy)}")
    return load_config(args.config or default_experiment(), overrides)


def default_experiment() -> Path | None:
    """The default experiment: ``simulations/default.toml`` of the source tree fedtune runs from
    (edit it to change what ``fedtune simulate`` runs); the built-in defaults, which it mirrors,
    when fedtune is installed without its source tree."""
    path = Path(__file__).resolve().parents[1] / "simulations" / "default.toml"
    return path if path.is_file() else None


def _strategies(args: argparse.Namespace) -> int:
    from strategies.registry import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{name:10s} {doc[0] if doc else ''}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedtune.deploy.certificates import generate_certificates, generate_node_keys

    paths = generate_certificates(args.out, ("127.0.0.1", "localhost", "superlink", *args.host))
    keys = generate_node_keys(args.out / "keys", [f"supernode-{i}" for i in range(args.nodes)])
    LOG.info("wrote %s and %d SuperNode key pairs to %s (private keys mode 0600)",
             ", ".join(p.name for p in paths.values()), len(keys), args.out)
    return 0


def _compose(args: argparse.Namespace) -> int:
    from fedtune.deploy.compose import write_compose
    from fedtune.deploy.processes import NodeSpec, node_specs

    if args.nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {args.nodes}")
    cfg = load_config(args.config) if args.config else None
    nodes = (node_specs(cfg, args.nodes) if cfg and cfg.fleet.devices
             else [NodeSpec(i, args.nodes) for i in range(args.nodes)])
    for path in write_compose(args.dir, nodes):
        LOG.info("wrote %s", path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedtune.reporting.comparison import report

    out = args.out or args.runs[0] / "report"
    try:
        report(args.runs, out, target=args.target, command="fedtune report " + " ".join(map(str, args.runs)),
               prefer_masked=not args.unmasked)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc).removeprefix("fedtune report: ")) from None
    LOG.info("wrote %s, %s and plots to %s", out / "table.md", out / "summary.json", out)
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.explain:
        from fedtune.core.explain import render_markdown, render_text

        print(render_markdown() if args.format == "markdown" else render_text(), end="")
        return 0
    from fedtune.engine.simulation import preflight, quiet_library_warnings

    cfg = _load(args)
    quiet_library_warnings()
    preflight(cfg)
    tracker_classes(cfg)
    print(config_to_toml(cfg), end="")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.engine.simulation import (
        RunStopped,
        check_ray_address,
        preflight,
        prepare_environment,
        simulate,
    )

    cfg = _load(args)
    verbose = args.verbose or args.log_verbose
    prepare_environment(cfg, verbose)
    out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_run_dir(args, out, cfg)
    check_ray_address(cfg)
    preflight(cfg)
    tracker_classes(cfg)  # a bad outputs.trackers entry fails here, before Ray starts
    with run_log(out, mode="a" if args.resume else "w"):
        try:
            summary = simulate(cfg, out, resume=args.resume, force=args.force, verbose=verbose)
        except RunStopped as exc:
            LOG.warning("%s", exc)
            if not exc.clean:  # Ray is down, but threads of the run that wait on it would keep the process alive
                sys.stdout.flush()
                os._exit(exc.exit_status)
            return exc.exit_status
        metric = summary["metric"]
        LOG.info("%s: %.4f (round 0) -> %.4f (round %s); outputs in %s", metric, summary[f"initial_{metric}"],
                 summary[f"final_{metric}"], summary["rounds"], out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbose = args.log_verbose or getattr(args, "verbose", False)
    configure_logging(logging.WARNING if args.quiet else logging.DEBUG if verbose else logging.INFO)
    commands = {"strategies": _strategies, "certs": _certs, "compose": _compose, "report": _report,
                "config": _config, "deploy": lambda a: _deploy(a, _load(a)), "simulate": _simulate}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2


def _check_run_dir(args: argparse.Namespace, out: Path, cfg: ExperimentConfig) -> None:
    """--resume needs a checkpoint of the same config, a new run an empty --out (unless --force)."""
    from fedtune.round.checkpoint import check_run_dir

    check_run_dir(out, cfg, resume=args.resume, force=args.force)


def _deploy(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    import dataclasses

    from fedtune.deploy.processes import deploy
    from fedtune.engine.simulation import preflight, quiet_library_warnings

    if args.nodes is not None:
        if args.nodes < 1:
            raise ConfigError(f"--nodes: must be >= 1, got {args.nodes}")
        fed = dataclasses.replace(cfg.federation, num_clients=args.nodes,
                                  min_clients=min(cfg.federation.min_clients, args.nodes))
        cfg = dataclasses.replace(cfg, federation=fed)
    out = args.out or Path("runs") / f"{cfg.name}-deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_run_dir(args, out, cfg)
    quiet_library_warnings()
    preflight(cfg)
    tracker_classes(cfg)
    work_dir = args.work_dir or out / ("deployment-resumed" if args.resume else "deployment")
    try:
        with run_log(out, mode="a" if args.resume else "w"):
            status, _ = deploy(cfg, out, work_dir, tls=not args.insecure, auth=not args.no_auth,
                               worker=not args.no_worker, resume=args.resume, force=args.force, say=_deploy_say)
    except RuntimeError as exc:  # a process that did not start, a refused registration, a failed flwr run
        print(f"fedtune: error: {exc} (logs in {work_dir / 'logs'})", file=sys.stderr)
        return 1
    return 0 if status == "finished:completed" else 1


def _deploy_say(line: str) -> None:
    """A line of ``deploy``'s progress. Its round lines repeat the server's, which the ServerApp's
    process writes to the same run.log: they are marked ``echo`` and left out of it."""
    text = line.removeprefix("[fedtune] ")
    LOG.info("%s", text, extra={"echo": text.startswith("round ")})


if __name__ == "__main__":
    sys.exit(main())
