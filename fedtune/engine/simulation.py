"""Run an experiment on Flower's simulation engine (Ray backend) in this process.

The ServerApp runs the fedtune round loop (:func:`fedtune.round.loop.run_server`); every
simulated SuperNode runs :mod:`clients.app` in a Ray actor that keeps its base model
loaded across clients and rounds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedtune.core.config import ConfigError, ExperimentConfig

__all__ = ["prepare_environment", "preflight", "simulate"]


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast, before Ray starts, on a bad strategy, data set, model or fleet (ConfigError)."""
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import lora_shapes
    from strategies.registry import build_strategy

    build_strategy(cfg)
    fed = cached_federated_data(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
    for cid in range(cfg.federation.num_clients):
        if len(fed.partition(cid)) == 0:
            raise ConfigError(f"data.partitioner: client {cid} gets an empty partition; change partitioner_args")
    sim = cfg.simulation
    if (sim.num_gpus_per_client or sim.gpu_fraction_by_device) and not _cuda_visible():
        key = "simulation.gpu_fraction_by_device" if sim.gpu_fraction_by_device else "simulation.num_gpus_per_client"
        raise ConfigError(f"{key}: asks for GPUs, but no CUDA GPU is visible on this machine")
    base = cached_base_model(cfg.model, cfg.seed)
    lora_shapes(base, cfg)
    if cfg.fleet.devices:  # unknown devices, bad profile files: errors before Ray starts
        from fedtune.fleet.clock import FleetSimulator
        from fedtune.pruning.structure import model_structure

        FleetSimulator.from_config(cfg, base.model, model_structure(base.model))


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_environment(cfg: ExperimentConfig, verbose: bool = False) -> None:
    """Environment for Ray and its workers (set before Ray starts; workers inherit it)."""
    os.environ.setdefault("RAY_TMPDIR", cfg.simulation.ray_tmpdir)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:  # library deprecation chatter from every worker drowns the progress lines
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def simulate(cfg: ExperimentConfig, out_dir: Path, *, resume: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run the whole experiment; returns the run summary (raises if the server failed)."""
    prepare_environment(cfg, verbose)
    Path(cfg.simulation.ray_tmpdir).mkdir(parents=True, exist_ok=True)

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedtune.round.loop import run_server

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            outcome["summary"] = run_server(grid, cfg, out_dir, resume=resume)
        except BaseException as exc:  # reported after the simulation engine shuts down
            outcome["error"] = exc
            raise

    resources: dict[str, Any] = {"num_cpus": cfg.simulation.num_cpus_per_client}
    if cfg.simulation.num_gpus_per_client:
        resources["num_gpus"] = cfg.simulation.num_gpus_per_client
    elif cfg.simulation.gpu_fraction_by_device:  # Flower's Ray workers share one spec: the largest class share
        resources["num_gpus"] = max(cfg.simulation.gpu_fraction_by_device.values())
    init_args: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    if cfg.simulation.ray_address:  # a multi-node cluster: its nodes bring their own CPUs and GPUs
        init_args["address"] = cfg.simulation.ray_address
    else:
        init_args.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    backend_config = {"client_resources": resources, "init_args": init_args}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                   backend_name=cfg.simulation.backend, backend_config=backend_config, verbose_logging=verbose)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a server result (see the log above)")
    return outcome["summary"]
