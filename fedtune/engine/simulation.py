"""Run an experiment on Flower's simulation engine (Ray backend) in this process.

The ServerApp runs the fedtune round loop (:func:`fedtune.round.loop.run_server`); every
simulated SuperNode runs :mod:`clients.app` in a Ray actor that keeps its base model
loaded across clients and rounds.

Stopping: SIGTERM or SIGINT during :func:`simulate` stops the run in order. The server stops
waiting for replies, Ray's actors are killed and Ray is shut down (with it the local Ray processes
the run started), and :class:`RunStopped` reports the last round whose checkpoint was committed,
from which ``--resume`` continues. A second signal ends the process at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedtune.core.config import ConfigError, ExperimentConfig, ray_host_port

__all__ = ["STOP_GRACE_S", "RunStopped", "check_ray_address", "preflight", "prepare_environment", "quiet_library_warnings",
           "simulate"]

# after a stop signal, how long the server may take to finish what it is doing (an evaluation, a
# checkpoint) before the run is reported stopped without it
STOP_GRACE_S = 15.0
# after a stop signal and ray.shutdown(), how long the local Ray processes of the run (GCS, raylet,
# workers) may take to exit before they are killed
RAY_EXIT_WAIT_S = 10.0


class RunStopped(Exception):
    """A run ended by a signal (SIGTERM, SIGINT).

    ``last_round`` is the round of the run's committed checkpoint (None when there is none), from
    which ``--resume`` continues. ``clean`` is False when threads of the run are still alive after
    Ray was shut down: the server, when it was still busy :data:`STOP_GRACE_S` after the signal, or
    Flower's engine threads that were waiting on a client's result (they never return once Ray is
    down). The process would wait for them at exit; the caller should end it with ``os._exit``.
    """

    def __init__(self, signum: int, last_round: int | None, clean: bool = True) -> None:
        self.signum, self.last_round, self.clean = signum, last_round, clean
        name = signal.Signals(signum).name
        if last_round is None:
            message = f"stopped by {name} before a round was checkpointed; nothing to resume"
        else:
            message = f"stopped by {name} after round {last_round}; resume with --resume"
        super().__init__(message)

    @property
    def exit_status(self) -> int:
        """The shell's status of a process ended by the signal: 128 + its number (143, 130)."""
        return 128 + self.signum


class _Interrupted(BaseException):
    """Raised in the main thread by the stop-signal handler (not an Exception: Flower's and the
    strategies' ``except Exception`` must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _ServerStopped(BaseException):
    """Raised in the server thread when it waits for replies after a stop signal."""


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast, before Ray starts, on a bad strategy, policy, data set, partitioner, model,
    LoRA target module or fleet (ConfigError). ``fedtune simulate``, ``config`` and ``deploy`` run it."""
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import cached_base_model
    from fedtune.training.local import lora_shapes
    from strategies.registry import build_strategy

    build_strategy(cfg)
    fed = cached_federated_data(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
    if empty := fed.empty_partitions():  # from the partitioner's index table: no partition is built
        raise ConfigError(f"data.partitioner: client {empty[0]} gets an empty partition; change partitioner_args")
    sim = cfg.simulation
    if (sim.num_gpus_per_client or sim.gpu_fraction_by_device) and not _cuda_visible():
        key = "simulation.gpu_fraction_by_device" if sim.gpu_fraction_by_device else "simulation.num_gpus_per_client"
        raise ConfigError(f"{key}: asks for GPUs, but no CUDA GPU is visible on this machine")
    base = cached_base_model(cfg.model, cfg.seed)
    _check_target_modules(cfg, [name for name, _ in base.model.named_modules()])
    lora_shapes(base, cfg)
    if cfg.fleet.devices:  # unknown devices, bad profile files: errors before Ray starts
        from fedtune.fleet.clock import FleetSimulator
        from fedtune.pruning.structure import model_structure

        FleetSimulator.from_config(cfg, base.model, model_structure(base.model))


def _check_target_modules(cfg: ExperimentConfig, module_names: list[str]) -> None:
    """Every entry of ``lora.target_modules`` must name modules of the base model (peft's rule for a
    list: a module whose name is the entry or ends in ``.<entry>``); peft itself only refuses a list
    of which no entry matches."""
    for target in cfg.lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in module_names):
            raise ConfigError(f"lora.target_modules: {target!r} matches no module of {cfg.model.name!r},"
                              f" got {cfg.lora.target_modules}")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def check_ray_address(cfg: ExperimentConfig) -> None:
    """Fail fast when the Ray cluster the run attaches to does not answer.

    The address is ``simulation.ray_address``, or ``$RAY_ADDRESS`` when that key is empty (Ray reads
    it too); ``""`` and ``"local"`` start a local Ray and need no check, ``"auto"`` is resolved as
    Ray resolves it. A TCP connection to its host and port must open within
    ``simulation.ray_connect_timeout_s`` (name resolution included), else a ConfigError names the
    address. Ray itself would retry an unreachable address for minutes.
    """
    timeout = cfg.simulation.ray_connect_timeout_s
    address, key = cfg.simulation.ray_address, "simulation.ray_address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, key = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address in ("", "local"):
        return
    if address == "auto":
        address = _auto_ray_address(key)
        if address is None:
            return
    host_port = ray_host_port(address)
    if host_port is None:
        raise ConfigError(f"{key}: expected host:port, ray://host:port or auto, got {address!r}")
    reason = _tcp_probe(*host_port, timeout)
    if reason is not None:
        raise ConfigError(f"{key}: no Ray cluster answers at {address} ({reason}; waited up to {timeout:g}s,"
                          " simulation.ray_connect_timeout_s)")


def _auto_ray_address(key: str) -> str | None:
    """The cluster address ``auto`` stands for (Ray's own lookup), or None when Ray's lookup is not
    available to ask (Ray then resolves it itself)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # pragma: no cover - a Ray without this helper
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise ConfigError(f"{key}: 'auto' finds no running Ray cluster on this machine (start one with"
                          " `ray start --head`, or give host:port), got 'auto'") from None


def _tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why not.
    Runs in a daemon thread so that a slow name lookup is bounded by ``timeout`` too."""
    result: dict[str, str | None] = {}

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["reason"] = None
        except OSError as exc:
            result["reason"] = exc.strerror or str(exc) or type(exc).__name__

    probe = threading.Thread(target=connect, name="fedtune-ray-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.is_alive() or "reason" not in result:
        return "no answer"
    return result["reason"]


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
        quiet_library_warnings()


def quiet_library_warnings() -> None:
    """Hide the libraries' FutureWarning and DeprecationWarning chatter in this process."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class _StopSignals:
    """SIGTERM and SIGINT handlers for the length of a run (main thread only).

    The first signal sets :attr:`stop` (the server gives up waiting for replies) and, while
    :attr:`raising`, raises :class:`_Interrupted` in the main thread, which unwinds Flower's
    simulation engine (it kills the actors and shuts Ray down on the way out). A second signal
    ends the process at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self.raising = True
        self.ray_processes: list[Any] = []  # the local Ray processes when the first signal came
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._saved.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._saved.clear()

    def note(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            self.ray_processes = _ray_descendants()
        self.stop.set()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            sys.stderr.write(f"[fedtune] {signal.Signals(signum).name} again: exiting now\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.note(signum)
        if self.raising:
            raise _Interrupted(signum)


def _stoppable(grid: Any, stop: threading.Event) -> Any:
    """``grid`` whose ``send_and_receive`` raises :class:`_ServerStopped` once ``stop`` is set
    instead of waiting out the round timeout. The method is replaced on the object itself (the
    strategies look at the grid's class); the rest is Flower's ``send_and_receive``."""

    def send_and_receive(messages: Any, *, timeout: float | None = None) -> list[Any]:
        if stop.is_set():
            raise _ServerStopped
        waiting = set(grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Any] = []
        while timeout is None or time.time() < end:
            got = list(grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            if stop.wait(getattr(grid, "pull_interval", 0.1)):
                raise _ServerStopped
        return replies

    grid.send_and_receive = send_and_receive
    return grid


def _init_ray(init_args: dict[str, Any]) -> None:
    """Start (or attach to) Ray here, as Flower's Ray backend would, so that this process's signal
    handlers can be put back afterwards (``ray.init`` installs its own SIGTERM handler)."""
    import ray

    if ray.is_initialized():
        return
    # Ray's workers inherit the environment but not this process's sys.path (Flower does the same)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
    except SystemExit as exc:  # Ray's SIGTERM handler, in force while ray.init runs
        if exc.code == signal.SIGTERM:
            raise _Interrupted(signal.SIGTERM) from None
        raise


def _shutdown_ray() -> None:
    """Shut Ray down if this process uses it: kills this run's actors, and the local Ray processes
    when the run started them (an attached cluster keeps running)."""
    ray = sys.modules.get("ray")
    if ray is not None:
        ray.shutdown()


def _ray_descendants() -> list[Any]:
    """This process's descendants that are Ray's (GCS, raylet, workers, Ray's Python helpers): the
    local Ray a run started. An attached cluster's processes are not descendants."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            name, cmdline = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if name in ("gcs_server", "raylet") or name.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmdline:
            found.append(proc)
    return found


def _running(proc: Any) -> bool:
    """Whether ``proc`` still runs (a zombie has exited; an orphaned one may never be reaped here)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(processes: list[Any], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``processes`` to exit (ray.shutdown() only signals them);
    kill those that do not."""
    import psutil

    deadline = time.monotonic() + timeout
    left = [proc for proc in processes if _running(proc)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [proc for proc in left if _running(proc)]
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _threads_left(timeout: float) -> bool:
    """Whether threads that the interpreter waits for at exit (non-daemon ones, other than this one)
    are still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    for thread in others:
        thread.join(max(0.0, deadline - time.monotonic()))
    return any(t.is_alive() for t in others)


def _last_round(out_dir: Path) -> int | None:
    from fedtune.round.checkpoint import read_checkpoint_meta

    try:
        return int(read_checkpoint_meta(out_dir / "checkpoint")["round"])
    except (OSError, ConfigError, KeyError, ValueError):
        return None


def simulate(cfg: ExperimentConfig, out_dir: Path, *, resume: bool = False, force: bool = False,
             verbose: bool = False) -> dict[str, Any]:
    """Run the whole experiment; returns the run summary (raises if the server failed).

    ``resume`` continues from ``out_dir``'s checkpoint, ``force`` also when it was written under a
    different experiment config. Raises :class:`RunStopped` when SIGTERM or SIGINT stopped the run,
    and a ConfigError when ``simulation.ray_address`` does not answer.
    """
    prepare_environment(cfg, verbose)
    check_ray_address(cfg)
    Path(cfg.simulation.ray_tmpdir).mkdir(parents=True, exist_ok=True)

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedtune.engine.dispatch import pending_dispatch
    from fedtune.round.loop import run_server

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    signals = _StopSignals()
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        outcome["thread"] = threading.current_thread()
        try:
            outcome["summary"] = run_server(_stoppable(grid, signals.stop), cfg, out_dir, resume=resume, force=force)
        except _ServerStopped:  # a stop signal: the main thread reports it
            pass
        except BaseException as exc:  # reported after the simulation engine shuts down
            outcome["error"] = exc
            raise

    resources: dict[str, Any] = {"num_cpus": cfg.simulation.num_cpus_per_client}
    if cfg.simulation.num_gpus_per_client:
        resources["num_gpus"] = cfg.simulation.num_gpus_per_client
    elif cfg.simulation.gpu_fraction_by_device:  # Flower's Ray workers share one spec: the largest class share
        resources["num_gpus"] = max(cfg.simulation.gpu_fraction_by_device.values())
    init_args: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    address = cfg.simulation.ray_address
    if address and address != "local":  # a multi-node cluster: its nodes bring their own CPUs and GPUs
        init_args["address"] = address
    else:
        init_args.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    backend_config = {"client_resources": resources, "init_args": init_args}
    signals.install()
    try:
        _init_ray(dict(init_args))
        signals.install()  # ray.init replaced the SIGTERM handler
        with pending_dispatch(cfg.simulation.dispatch == "pending"):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                           backend_name=cfg.simulation.backend, backend_config=backend_config,
                           verbose_logging=verbose)
    except _Interrupted as exc:
        signals.note(exc.signum)
    except BaseException:
        if signals.signum is None:
            raise
    finally:  # a signal from here on is noted, not raised: the clean-up runs to its end
        signals.raising = False
        signals.stop.set()
        server = outcome.get("thread")
        if signals.signum is not None and server is not None:
            server.join(STOP_GRACE_S)  # let it finish the checkpoint or evaluation it is in
        _shutdown_ray()
        if signals.signum is not None:
            _reap([*signals.ray_processes, *_ray_descendants()], RAY_EXIT_WAIT_S)
        signals.restore()
    if signals.signum is not None and "summary" not in outcome:
        raise RunStopped(signals.signum, _last_round(out_dir), clean=not _threads_left(2.0))
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a server result (see the log above)")
    return outcome["summary"]
