"""The server's checkpoint: the global state (safetensors, the message key scheme) and its metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from fedtune.lora.factors import GlobalAdapter
from fedtune.lora.records import record_to_state, state_to_record

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: GlobalAdapter, server_round: int, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Atomically write the server state after ``server_round`` (safetensors + JSON)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_to_record(state).to_torch_state_dict()  # the same key scheme as messages
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(path / "state.safetensors")
    meta = {"round": server_round, **(extra or {})}
    (path / "meta.json.tmp").write_text(json.dumps(meta))
    (path / "meta.json.tmp").replace(path / "meta.json")


def load_checkpoint(path: Path) -> tuple[GlobalAdapter, dict[str, Any]]:
    meta = json.loads((path / "meta.json").read_text())
    return record_to_state(ArrayRecord(load_file(str(path / "state.safetensors")))), meta
