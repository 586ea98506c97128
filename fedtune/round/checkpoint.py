"""The server's checkpoint: the global state (safetensors, the message key scheme) and its metadata.

Layout of a run's ``checkpoint/`` folder::

    checkpoint/
      LATEST              the name of the committed round directory, e.g. "round-0007"
      round-0006/         the previous committed round (kept for inspection)
        state.safetensors
        meta.json         {"round": 6, "config_hash": ..., "wall_time_s": ..., "strategy": {...}}
      round-0007/
        state.safetensors
        meta.json

A round is committed in one step. Its state and metadata are written into a fresh directory
(each file and the directory fsync'd), the directory is renamed to ``round-NNNN``, and only then
is ``LATEST`` replaced atomically (a temporary file, fsync, ``os.replace``, fsync of the folder).
A crash at any point leaves ``LATEST`` naming a complete round whose state and metadata belong
together; a round directory that ``LATEST`` does not name is never read, and is removed by the
next commit. Only the two newest committed rounds are kept.

Checkpoints of the earlier single-directory layout (``state.safetensors`` and ``meta.json``
directly in ``checkpoint/``, no ``LATEST``) are not read: those files could hold one round's
state next to the previous round's metadata. :func:`load_checkpoint` and :func:`check_run_dir`
refuse them with a :class:`~fedtune.core.config.ConfigError` that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from safetensors.torch import load, save

from fedtune.core.config import ConfigError, ExperimentConfig, config_to_dict
from fedtune.lora.factors import GlobalAdapter
from fedtune.lora.records import record_to_state, state_to_record
from fedtune.round.outputs import fsync_dir

__all__ = [
    "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "has_checkpoint", "remove_checkpoint",
    "config_hash", "check_run_dir", "POINTER", "KEEP_ROUNDS",
]

POINTER = "LATEST"
KEEP_ROUNDS = 2
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_ROUND_DIR = re.compile(r"round-(\d{4,})")
# Keys that say how long or where a run goes, not what it computes: a run resumes across them.
_UNHASHED = (("federation", "num_rounds"), ("federation", "round_timeout_s"), ("simulation",), ("faults",),
             ("outputs",))


def _round_dir_name(server_round: int) -> str:
    return f"round-{server_round:04d}"


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync the file (not its directory)."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _pointer_target(path: Path) -> str | None:
    """The round directory ``LATEST`` names, or None when no round was committed."""
    pointer = path / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _ROUND_DIR.fullmatch(name):
        raise ConfigError(f"checkpoint {path}: {POINTER} names {name!r}, not a round directory")
    return name


def _old_layout(path: Path) -> bool:
    return not (path / POINTER).exists() and ((path / META_FILE).exists() or (path / STATE_FILE).exists())


def _refuse_old_layout(path: Path) -> None:
    if _old_layout(path):
        raise ConfigError(f"checkpoint {path}: the old single-directory layout ({STATE_FILE} and {META_FILE}"
                          f" without {POINTER}), which this version does not resume; start the run again")


def config_hash(cfg: ExperimentConfig) -> str:
    """sha256 of the experiment config as canonical JSON (sorted keys), leaving out the keys that do
    not change what a run computes: ``federation.num_rounds`` (a run resumes to more rounds),
    ``federation.round_timeout_s``, ``[simulation]`` (where clients run), ``[faults]`` (test
    injection) and ``[outputs]`` (what is written beside the metrics)."""
    table = config_to_dict(cfg)
    for keys in _UNHASHED:
        parent = table
        for key in keys[:-1]:
            parent = parent.get(key, {})
        parent.pop(keys[-1], None)
    canonical = json.dumps(table, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_checkpoint(state: GlobalAdapter, server_round: int, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Commit the server state after ``server_round`` under ``path`` (see the module docstring).

    ``extra`` is merged into the round's ``meta.json`` (``round`` is set here). Raises
    ``ValueError`` when ``server_round`` is the round ``LATEST`` already names: a committed round is
    never rewritten in place.
    """
    path.mkdir(parents=True, exist_ok=True)
    previous = _pointer_target(path)
    name = _round_dir_name(server_round)
    if name == previous:
        raise ValueError(f"checkpoint {path}: round {server_round} is already committed")
    tmp = path / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = state_to_record(state).to_torch_state_dict()  # the same key scheme as messages
    _write_durably(tmp / STATE_FILE, save(tensors))
    _write_durably(tmp / META_FILE, json.dumps({"round": server_round, **(extra or {})}).encode())
    fsync_dir(tmp)
    final = path / name
    if final.exists():  # an uncommitted round directory of an interrupted session
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(path)
    pointer_tmp = path / f"{POINTER}.tmp"
    _write_durably(pointer_tmp, (name + "\n").encode())
    os.replace(pointer_tmp, path / POINTER)
    fsync_dir(path)
    _prune(path, keep={name, previous})


def _prune(path: Path, keep: set[str | None]) -> None:
    """Remove round directories other than ``keep`` (at most :data:`KEEP_ROUNDS`) and leftovers of
    interrupted commits."""
    for entry in path.iterdir():
        name = entry.name
        if name in keep or name == POINTER:
            continue
        if _ROUND_DIR.fullmatch(name) or (name.startswith(".round-") and name.endswith(".tmp")):
            shutil.rmtree(entry, ignore_errors=True)
        elif name in (f"{POINTER}.tmp", STATE_FILE, META_FILE):  # LATEST exists: old-layout files are stale
            entry.unlink(missing_ok=True)


def has_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a committed checkpoint (``LATEST`` naming a complete round directory)."""
    try:
        name = _pointer_target(path)
    except ConfigError:
        return False
    return name is not None and (path / name / META_FILE).is_file() and (path / name / STATE_FILE).is_file()


def _committed_dir(path: Path) -> Path:
    _refuse_old_layout(path)
    name = _pointer_target(path)
    if name is None:
        raise FileNotFoundError(f"checkpoint {path}: no committed round ({POINTER} is missing)")
    if not ((path / name / META_FILE).is_file() and (path / name / STATE_FILE).is_file()):
        raise ConfigError(f"checkpoint {path}: {POINTER} names {name}, which is incomplete")
    return path / name


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The committed round's metadata (``round``, ``config_hash``, ...) without loading its state.

    Raises ``FileNotFoundError`` when nothing was committed (no ``LATEST``), and
    :class:`~fedtune.core.config.ConfigError` for a checkpoint of the old single-directory layout or
    one whose ``LATEST`` names a missing or incomplete round directory.
    """
    round_dir = _committed_dir(path)
    meta = json.loads((round_dir / META_FILE).read_text())
    if _round_dir_name(int(meta["round"])) != round_dir.name:
        raise ConfigError(f"checkpoint {round_dir}: {META_FILE} is of round {meta['round']}")
    return meta


def load_checkpoint(path: Path) -> tuple[GlobalAdapter, dict[str, Any]]:
    """The committed round's global state and metadata, read from the directory ``LATEST`` names;
    raises as :func:`read_checkpoint_meta` does."""
    meta = read_checkpoint_meta(path)
    data = (_committed_dir(path) / STATE_FILE).read_bytes()
    return record_to_state(ArrayRecord(load(data))), meta


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder (a new run in a used directory starts without one)."""
    if path.exists():
        shutil.rmtree(path)


def check_run_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, force: bool) -> None:
    """Refuse to start a run in ``out`` that would resume nothing, resume a different experiment, or
    write over an earlier run; raises :class:`~fedtune.core.config.ConfigError` with one line.

    - ``resume`` and no committed checkpoint in ``out``: refused (``force`` does not help);
    - ``resume`` and the checkpoint was written under a different config (:func:`config_hash`):
      refused unless ``force``;
    - not ``resume`` and ``out`` exists and is not empty: refused unless ``force``. The forced run
      starts afresh: :func:`fedtune.round.loop.restore` removes the old checkpoint and
      ``summary.json``, and the metrics writer truncates ``metrics.jsonl``.
    """
    ckpt = out / "checkpoint"
    if resume:
        if _old_layout(ckpt):
            raise ConfigError(f"--resume: {out} holds a checkpoint of the old single-directory layout, which"
                              " this version does not resume; start the run again (--force, without --resume)")
        if not has_checkpoint(ckpt):
            raise ConfigError(f"--resume: no checkpoint in {out}")
        stored = read_checkpoint_meta(ckpt).get("config_hash")
        if stored != config_hash(cfg) and not force:
            raise ConfigError(f"--resume: the checkpoint in {out} was written under a different experiment config"
                              " than this one; pass --force to resume anyway")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"--out {out}: not empty (a run is there); pass --resume to continue it"
                          " or --force to overwrite")
