"""Stopping a run: SIGTERM and SIGINT end ``fedtune simulate`` in order (Ray shut down, the last
checkpoint intact, status 128 + signal); a Ray address that does not answer fails in bounded time."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fedtune.cli import main
from fedtune.core.config import ConfigError, load_config
from fedtune.deploy.processes import free_port
from fedtune.engine import simulation
from tests.conftest import ROOT

SMOKE = ROOT / "simulations" / "smoke.toml"


@pytest.mark.parametrize("address, reason", [
    ("nohost.invalid:1", None),  # no such host: the name lookup fails
    ("127.0.0.1:{port}", "Connection refused"),  # nothing listens there
], ids=["unknown-host", "closed-port"])
def test_an_unreachable_ray_address_fails_fast_naming_it(address, reason, capsys, tmp_path):
    address = address.format(port=free_port())
    started = time.monotonic()
    code = main(["simulate", "--config", str(SMOKE), "--out", str(tmp_path / "run"),
                 "--set", f'simulation.ray_address="{address}"', "--set", "simulation.ray_connect_timeout_s=5"])
    took = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"fedtune: error: simulation.ray_address: no Ray cluster answers at {address} (")
    assert reason is None or reason in err
    assert len(err.splitlines()) == 1
    assert took < 15  # the probe gives up after 5 s at most; nothing heavy was loaded first
    assert not (tmp_path / "run").exists()


def test_a_probe_without_answer_gives_up_after_the_connect_timeout(monkeypatch):
    release = threading.Event()

    def silent(address, timeout=None):  # a name lookup or a SYN that never comes back
        release.wait(30)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", silent)
    cfg = load_config(SMOKE, ['simulation.ray_address="head.example:6379"', "simulation.ray_connect_timeout_s=0.5"])
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"^simulation.ray_address: no Ray cluster answers at head.example:6379"
                                              r" \(no answer; waited up to 0.5s"):
            simulation.check_ray_address(cfg)
    finally:
        release.set()
    assert time.monotonic() - started < 3


def test_the_ray_address_environment_variable_is_checked_too(monkeypatch):
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"^RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:{port} \("):
        simulation.check_ray_address(load_config(SMOKE, ["simulation.ray_connect_timeout_s=2"]))
    monkeypatch.delenv("RAY_ADDRESS")
    simulation.check_ray_address(load_config(SMOKE))  # a local Ray: nothing to check


def test_a_stopped_run_reports_its_last_round_and_the_signal_status():
    stopped = simulation.RunStopped(signal.SIGTERM, 3)
    assert str(stopped) == "stopped by SIGTERM after round 3; resume with --resume" and stopped.exit_status == 143
    assert simulation.RunStopped(signal.SIGINT, None).exit_status == 130
    assert "nothing to resume" in str(simulation.RunStopped(signal.SIGINT, None))


def _last_round(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return -1
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line)["round"])
        except ValueError:  # a line being written
            pass
    return max(rounds, default=-1)


def _name(proc):
    import psutil

    try:
        return proc.name()
    except psutil.Error:
        return None


def _running(proc):
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["SIGTERM"])  # SIGINT: the same handler (SIGNALS)
def test_a_signal_stops_a_simulation_in_order(signum, tmp_path):
    """After round 1, the signal ends the run within 30 s with status 128 + signal and one line naming
    the last checkpointed round; the checkpoint loads; no Ray process of the run is left."""
    import psutil

    from fedtune.round.checkpoint import load_checkpoint

    out = tmp_path / "run"
    env = {**os.environ, "RAY_TMPDIR": "/tmp/fedtune-ray-sig", "PYTHONUNBUFFERED": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    log_path = tmp_path / "simulate.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "simulate", "--config", str(SMOKE), "--out",
                                 str(out), "--set", "federation.num_rounds=50"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    ray_processes = []
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and _last_round(out) < 1:
            time.sleep(0.3)
        assert proc.poll() is None and _last_round(out) >= 1, log_path.read_text()[-3000:]
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert "raylet" in {_name(p) for p in ray_processes}
        sent = time.monotonic()
        proc.send_signal(signum)
        status = proc.wait(timeout=90)
        took = time.monotonic() - sent
        deadline = time.monotonic() + 30
        while any(_running(p) for p in ray_processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p.pid for p in ray_processes if _running(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in ray_processes:
            if _running(p):
                p.kill()
    text = log_path.read_text()
    assert status == 128 + signum, text[-3000:]
    assert took < 30, text[-3000:]
    assert left == [], text[-3000:]
    state, meta = load_checkpoint(out / "checkpoint")
    assert meta["round"] >= 1 and state is not None
    assert _last_round(out) >= meta["round"]
    name = signal.Signals(signum).name
    assert [line for line in text.splitlines() if "stopped by" in line] == [
        f"[fedtune] stopped by {name} after round {meta['round']}; resume with --resume"]
