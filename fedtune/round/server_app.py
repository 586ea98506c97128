"""The Flower ServerApp for ``flwr run``: reads the experiment named in the run config.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, or ``--run-config``):
``experiment`` (a TOML file, relative to the app directory), ``overrides`` (``KEY=VALUE``
pairs separated by ``;``), ``out-dir``, ``resume`` (continue from ``out-dir``'s checkpoint) and, when the
app declares it, ``force`` (resume a checkpoint written under a different experiment config).
``federation.num_clients`` must equal the number of SuperNodes, each started with ``partition-id`` in
its node config.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.core.config import load_config
from fedtune.round.loop import run_server

__all__ = ["app"]


APP_DIR = Path(__file__).resolve().parents[2]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    experiment = str(rc.get("experiment", "")).strip()
    path = None
    if experiment:
        path = Path(experiment) if Path(experiment).is_absolute() else APP_DIR / experiment
    overrides = [x.strip() for x in str(rc.get("overrides", "")).split(";") if x.strip()]
    cfg = load_config(path, overrides)
    resume, force = (str(rc.get(key, False)).lower() in ("1", "true", "yes") for key in ("resume", "force"))
    run_server(grid, cfg, Path(str(rc.get("out-dir", "runs/flwr"))).expanduser().resolve(), resume=resume,
               force=force)
