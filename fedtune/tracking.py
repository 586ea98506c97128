"""Run tracking: fedtune's log output and the per-round scalars handed to trackers.

**Logging.** fedtune's progress lines go through :mod:`logging`, under the ``fedtune`` logger
(``fedtune.round``, ``fedtune.cli``, ...). :func:`configure_logging` puts them on the console as
``[fedtune] <message>``: INFO and DEBUG on stdout, warnings and errors on stderr, at the level the
CLI's ``--quiet`` / ``--verbose`` choose. :func:`run_log` adds ``<run>/run.log``, which holds every
record at DEBUG with its time, level and logger name.

**Trackers.** After each round the loop turns the round's ``metrics.jsonl`` record into groups of
scalars (:func:`round_scalars`): ``eval`` (held-out loss, accuracy or perplexity, masked metrics,
evaluation time), ``train`` (mean client loss, clients ok and failed), ``time`` (wall and simulated
seconds, the round's wall seconds), ``bytes`` (up, down) and, in fleet runs, one group per device
class, ``device/<class>`` (clients sampled and ok, and the mean over its ok clients of their
numeric fields: train loss, rank, train time, simulated seconds, bytes, memory, ...). Each group
goes to every tracker as ``log_scalars(round, scalars, prefix)``. ``metrics.jsonl`` remains the
full JSONL record of the run; trackers get its numbers.

Built in: ``tensorboard`` (``outputs.tensorboard = true``): event files under ``<run>/tensorboard/``,
tags ``<prefix>/<name>`` (``eval/accuracy``, ``device/jetson-tx2/train_loss``), the config as text;
view them with ``tensorboard --logdir runs``. It needs the ``tensorboard`` package
(``pip install 'fedtune[tracking]'``).

A tracker of your own is any class with the three methods of :class:`Tracker`, constructed with
the run directory, named in ``outputs.trackers`` as ``package.module:Class`` or
``path/to/file.py:Class``. A Weights & Biases adapter, for example::

    # my_trackers.py; outputs.trackers = ["my_trackers.py:WandbTracker"]
    import wandb

    class WandbTracker:
        def __init__(self, run_dir):
            self.run = wandb.init(project="fedtune", name=run_dir.name, dir=str(run_dir))

        def log_config(self, config):
            self.run.config.update(config)

        def log_scalars(self, step, scalars, prefix=""):
            self.run.log({f"{prefix}/{k}" if prefix else k: v for k, v in scalars.items()}, step=step)

        def close(self):
            self.run.finish()

A tracker that raises while the run goes on is reported once as a warning and dropped; the run
continues. One that cannot be constructed stops the run before its first round.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import tomli_w

from fedtune.core.config import ConfigError, ExperimentConfig, config_to_dict
from fedtune.core.plugins import load_plugin
from fedtune.core.protocol import ClientKey, RoundKey, Status

__all__ = ["CONSOLE_FORMAT", "FILE_FORMAT", "RUN_LOG", "TRACKERS", "RunTrackers", "TensorBoardTracker", "Tracker",
           "configure_logging", "ensure_logging", "round_scalars", "run_log", "tracker_classes"]

LOGGER = "fedtune"
RUN_LOG = "run.log"
CONSOLE_FORMAT = "[fedtune] %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
log = logging.getLogger("fedtune.tracking")


# ----------------------------------------------------------------------------- logging


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of each record (a test's
    capture, a worker's redirect), not the stream of the moment it was made."""

    def __init__(self, stream_name: str) -> None:
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _not_echo(record: logging.LogRecord) -> bool:
    """run.log leaves out records marked ``echo``: lines repeated from another process's run.log."""
    return not getattr(record, "echo", False)


def configure_logging(level: int = logging.INFO) -> None:
    """Console output of the ``fedtune`` loggers at ``level`` (replacing an earlier configuration):
    records below WARNING on stdout, the others on stderr, each as ``[fedtune] <message>``."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    out, err = _ConsoleHandler("stdout"), _ConsoleHandler("stderr")
    out.setLevel(level)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(max(level, logging.WARNING))
    for handler in (out, err):
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # the handlers filter; run.log takes everything


def ensure_logging() -> None:
    """:func:`configure_logging` at INFO unless fedtune's console output is configured already (a
    ServerApp under ``flwr run``, a run started from Python)."""
    if not any(isinstance(h, _ConsoleHandler) for h in logging.getLogger(LOGGER).handlers):
        configure_logging(logging.INFO)


@contextlib.contextmanager
def run_log(run_dir: Path, mode: str = "a") -> Iterator[Path]:
    """Copy every ``fedtune`` record (DEBUG and up) to ``<run_dir>/run.log`` while the block runs.

    ``mode`` ``"w"`` starts the file afresh, ``"a"`` appends (a resumed run, a second process of
    the same run); writes always append, so processes of one run (``fedtune deploy`` and its
    ServerApp) share the file line by line. Nested or repeated for the same file, only the outermost
    call attaches it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOG
    logger = logging.getLogger(LOGGER)
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in logger.handlers):
        yield path
        return
    if mode == "w":
        path.write_text("")
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # O_APPEND: other processes append too
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(_not_echo)
    if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------- scalars


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _round_group(key: str) -> tuple[str, str]:
    """``(prefix, name)`` of a top-level numeric key of a round record."""
    if key.startswith("masked_eval_"):
        return "eval", "masked_" + key.removeprefix("masked_eval_")
    if key.startswith("eval_"):
        return "eval", key.removeprefix("eval_")
    if key == RoundKey.TRAIN_LOSS:
        return "train", "loss"
    if key.startswith("bytes_"):
        return "bytes", key.removeprefix("bytes_")
    if key.endswith("_s"):
        return "time", key
    return "round", key


def _device_groups(clients: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per device class: clients sampled and ok, and the mean of each numeric field over the ok ones."""
    groups: dict[str, dict[str, float]] = {}
    for device in sorted({str(c[ClientKey.DEVICE]) for c in clients if c.get(ClientKey.DEVICE)}):
        members = [c for c in clients if str(c.get(ClientKey.DEVICE)) == device]
        ok = [c for c in members if c.get(ClientKey.STATUS) == Status.OK]
        scalars = {"clients": float(len(members)), "clients_ok": float(len(ok))}
        fields = sorted({k for c in ok for k, v in c.items() if _number(v) is not None}
                        - {ClientKey.CLIENT_ID, ClientKey.NODE_ID})
        for key in fields:
            values = [v for c in ok if (v := _number(c.get(key))) is not None]
            scalars[key] = sum(values) / len(values)
        groups[f"device/{device}"] = scalars
    return groups


def round_scalars(record: dict[str, Any], previous_wall_s: float | None = None) -> dict[str, dict[str, float]]:
    """The scalars of one ``metrics.jsonl`` record, by prefix (see the module docstring);
    ``previous_wall_s`` (the previous record's ``wall_time_s``) adds ``time/round_wall_s``."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        number = _number(value)
        if number is None or key == RoundKey.ROUND:
            continue
        prefix, name = _round_group(key)
        groups.setdefault(prefix, {})[name] = number
    clients = record.get(RoundKey.CLIENTS) or []
    if record.get(RoundKey.ROUND, 0) > 0:
        ok = sum(c.get(ClientKey.STATUS) == Status.OK for c in clients)
        groups.setdefault("train", {}).update(clients_ok=float(ok), clients_failed=float(len(clients) - ok))
    wall = _number(record.get(RoundKey.WALL_TIME_S))
    if previous_wall_s is not None and wall is not None:
        groups.setdefault("time", {})["round_wall_s"] = wall - previous_wall_s
    groups.update(_device_groups(clients))
    return groups


# ----------------------------------------------------------------------------- trackers


@runtime_checkable
class Tracker(Protocol):
    """What a tracker does; it is constructed as ``cls(run_dir)`` (a :class:`~pathlib.Path`)."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's resolved experiment config, as nested dicts (once, before the first scalars)."""

    def log_scalars(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        """Scalars of round ``step`` under ``prefix`` (``eval``, ``train``, ``device/<class>``, ...)."""

    def close(self) -> None:
        """The run is over (or stopped): flush and release."""


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(f"outputs.tensorboard: needs the tensorboard package (pip install 'fedtune[tracking]'):"
                          f" {exc}") from None
    return SummaryWriter


class TensorBoardTracker:
    """TensorBoard event files under ``<run_dir>/tensorboard/``, one scalar tag per
    ``<prefix>/<name>``; the config as the text ``config``.

    The writer opens at the first round it is given, with that round as ``purge_step``: a resumed
    run's events replace those an interrupted session wrote past the checkpoint.
    """

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer_class = _summary_writer()
        self._writer: Any = None
        self._config_text = ""

    def log_config(self, config: dict[str, Any]) -> None:
        self._config_text = "```toml\n" + tomli_w.dumps(config) + "```"

    def log_scalars(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=step)
            if self._config_text:
                self._writer.add_text("config", self._config_text, step)
        for name, value in scalars.items():
            self._writer.add_scalar(f"{prefix}/{name}" if prefix else name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker}


def tracker_classes(cfg: ExperimentConfig) -> list[tuple[str, type]]:
    """``(config key, class)`` of every tracker ``cfg.outputs`` asks for (``outputs.tensorboard``
    first, then ``outputs.trackers``, each class once); a bad spec, or TensorBoard without its
    package, is a :class:`ConfigError` naming the key."""
    specs = [("outputs.tensorboard", "tensorboard")] if cfg.outputs.tensorboard else []
    specs += [(f"outputs.trackers[{i}]", spec.strip()) for i, spec in enumerate(cfg.outputs.trackers)]
    out: list[tuple[str, type]] = []
    for key, spec in specs:
        cls = load_plugin(spec, TRACKERS, Tracker, key)
        if cls is TensorBoardTracker:
            _summary_writer()
        if all(cls is not seen for _, seen in out):
            out.append((key, cls))
    return out


class RunTrackers:
    """The run's trackers, fed one round record at a time; a context manager that closes them."""

    def __init__(self, trackers: list[tuple[str, Tracker]]) -> None:
        self.trackers = list(trackers)
        self._last_wall: float | None = None

    @classmethod
    def open(cls, cfg: ExperimentConfig, run_dir: Path) -> RunTrackers:
        """Construct ``cfg``'s trackers for ``run_dir`` and give them the config."""
        trackers: list[tuple[str, Tracker]] = []
        for key, tracker_cls in tracker_classes(cfg):
            try:
                trackers.append((key, tracker_cls(run_dir)))
            except ConfigError:
                raise
            except Exception as exc:  # user code can fail any way
                raise ConfigError(f"{key}: {tracker_cls.__name__}({run_dir}) failed: {type(exc).__name__}:"
                                  f" {exc}") from exc
        run = cls(trackers)
        config = config_to_dict(cfg)
        run._each(lambda t: t.log_config(config))
        return run

    def _each(self, call: Any) -> None:
        for key, tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker must not end the run
                log.warning("%s: %s failed (%s: %s); it gets no more scalars", key, type(tracker).__name__,
                            type(exc).__name__, exc)
                self.trackers.remove((key, tracker))

    def log_round(self, record: dict[str, Any]) -> None:
        """Hand the scalars of one round record (:func:`round_scalars`) to every tracker."""
        step = int(record[RoundKey.ROUND])
        groups = round_scalars(record, self._last_wall)
        self._last_wall = _number(record.get(RoundKey.WALL_TIME_S))
        for prefix, scalars in groups.items():
            self._each(lambda t, p=prefix, s=scalars: t.log_scalars(step, s, p))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.trackers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
