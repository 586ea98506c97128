"""Loading user plug-ins: a registry name, ``package.module:Name`` or ``path/to/file.py:Name``.

Used for aggregation strategies now and bandit policies later. Every failure is a
:class:`~fedtune.core.config.ConfigError` that names the config key and the bad spec.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from fedtune.core.config import ConfigError

__all__ = ["load_plugin"]


def _load_module_from_file(path: Path, key: str, spec: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{key}: plug-in file not found: {path} (from {spec!r})")
    mod_name = f"fedtune_plugin_{abs(hash(str(path.resolve())))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - defensive
        raise ConfigError(f"{key}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code can fail any way
        del sys.modules[mod_name]
        raise ConfigError(f"{key}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_plugin(spec: str, registry: dict[str, type], base: type, key: str) -> type:
    """Resolve ``spec`` to a subclass of ``base``.

    ``registry`` maps lowercase names to classes; ``key`` is the config key reported in
    errors (e.g. ``federation.strategy``).
    """
    if ":" not in spec:
        if spec.lower() in registry:
            return registry[spec.lower()]
        raise ConfigError(f"{key}: unknown name {spec!r} (registered: {', '.join(sorted(registry))};"
                          " or give module:Class or path/to/file.py:Class)")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"{key}: malformed plug-in {spec!r}; expected module:Class or file.py:Class")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_module_from_file(Path(target).expanduser(), key, spec)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{key}: cannot import module {target!r}: {type(exc).__name__}: {exc}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"{key}: {target!r} has no attribute {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{key}: {spec!r} is not a subclass of {base.__module__}.{base.__name__}")
    return obj
