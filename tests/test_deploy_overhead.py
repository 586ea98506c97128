"""What a deployment's per-message ClientApp process carries and reports: the app bundle (FAB)
holds the app and no tests, benchmarks, results or documents; the worker hand-off reports where
its time went; the process's start time and the SuperExec's task poll. Unit tests: no process
of Flower's is started."""

import io
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.cli.build import build_fab_from_disk

from clients.app import _process_started_at
from clients.worker import WorkerUnavailable, ping, request_train, serve, socket_path
from fedtune.deploy.processes import SUPEREXEC_POLL_S, app_bundle, flwr_env

ROOT = Path(__file__).resolve().parents[1]


def bundle_names(fab: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


def test_the_app_bundle_holds_the_app_and_leaves_out_tests_results_and_documents():
    names = bundle_names(app_bundle(ROOT))  # raises if a fab-exclude pattern in pyproject.toml matches no file
    for needed in ("pyproject.toml", "LICENSE", "clients/app.py", "clients/worker.py", "clients/local.py",
                   "fedtune/round/server_app.py", "fedtune/fleet/devices.toml", "strategies/base.py",
                   "simulations/deploy.toml", "simulations/smoke.toml", "simulations/default.toml"):
        assert needed in names, f"{needed} missing from the app bundle"
    unwanted = [n for n in names if n.startswith(("tests/", "simulations/bench/", "simulations/results/", "scripts/",
                                                  "docs/", ".venv/", "runs/", "certificates/", "deployment/"))
                or n.endswith((".md", ".png", ".key", ".pem", ".yml")) or n == "simulations/reproduce.py"]
    assert not unwanted, f"left out by pyproject's [tool.flwr.app] fab-exclude, yet bundled: {unwanted}"


def test_app_bundle_builds_what_flwr_run_builds_without_walking_ignored_trees(tmp_path):
    app = tmp_path / "tinyapp"
    (app / "pkg").mkdir(parents=True)
    (app / "pkg" / "mod.py").write_text("X = 1\n")
    (app / "pkg" / "test_mod.py").write_text("def test(): pass\n")
    (app / "runs" / "r1").mkdir(parents=True)
    (app / "runs" / "r1" / "metrics.json").write_text("{}\n")
    (app / ".venv" / "lib").mkdir(parents=True)
    (app / ".venv" / "lib" / "site.py").write_text("\n")
    (app / "notes.md").write_text("# notes\n")
    (app / ".gitignore").write_text("runs/\n")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedtune"\nfab-exclude = [".gitignore", "**/*.md"]\n\n'
        '[tool.flwr.app.components]\nserverapp = "pkg.mod:server"\nclientapp = "pkg.mod:client"\n')
    fab = app_bundle(app)
    assert fab == build_fab_from_disk(app)
    assert sorted(bundle_names(fab)) == [".info/CONTENT", "pkg/mod.py", "pyproject.toml"]


def test_a_worker_hand_off_reports_where_its_time_went(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_WORKER_DIR", str(tmp_path / "w"))

    def slow_train(content, node_config, state, client_id, on_crash=None):
        time.sleep(0.2)
        return RecordDict({"metrics": MetricRecord({"records": len(content)})})

    threading.Thread(target=serve, args=(socket_path(5), 5.0), kwargs={"handler": slow_train}, daemon=True).start()
    deadline = time.monotonic() + 10
    while True:
        try:
            ping(5)
            break
        except WorkerUnavailable:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
    timing: dict[str, float] = {}
    out = request_train(RecordDict({"x": ConfigRecord({"a": 1})}), {}, RecordDict(), client_id=1, node_id=5,
                        timing=timing)
    assert out["metrics"]["records"] == 1
    assert set(timing) == {"encode_s", "connect_s", "exchange_s", "worker_read_s", "worker_handle_s",
                           "worker_encode_s", "receive_s", "total_s"}
    assert all(v >= 0 for v in timing.values()), timing
    assert 0.2 <= timing["worker_handle_s"] <= timing["exchange_s"] <= timing["total_s"]
    parts = sum(timing[k] for k in ("encode_s", "connect_s", "exchange_s", "receive_s"))
    assert parts == pytest.approx(timing["total_s"], abs=1e-3)


def test_the_process_start_time_is_read_as_psutil_computes_it():
    assert _process_started_at() == pytest.approx(psutil.Process().create_time(), abs=0.02)


def test_the_superexec_polls_for_tasks_at_fedtunes_interval_unless_the_environment_sets_one(tmp_path, monkeypatch):
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert flwr_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == SUPEREXEC_POLL_S
    assert 0.01 <= float(SUPEREXEC_POLL_S) < 1.0  # Flower accepts 0.01-60 s; its default is 1 s
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2.5")
    assert flwr_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2.5"
