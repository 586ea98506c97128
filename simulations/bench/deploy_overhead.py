"""Per-round client overhead in a real Flower deployment: with and without the persistent worker,
where a client-round's overhead goes, and the floor that Flower's per-message process puts there.

A SuperNode starts a fresh ClientApp process for every message. Without a worker that
process imports torch, transformers and peft and rebuilds the model and data before it can
train; with ``client-worker=true`` (fedtune's default in deployment) it stays light and hands
the message to the node's persistent worker (clients/worker.py). Both runs use the same
topology (`fedtune deploy`: SuperLink + 3 SuperNodes as processes on 127.0.0.1, TLS and
SuperNode auth on), the same experiment (simulations/deploy.toml), one after the other.

client overhead of a client-round = the ClientApp process's age when its reply is ready
minus the training time inside it (what the process costs beyond training). Reported as
the mean over client-rounds after the first round (steady state; the first round also starts
the workers) and over all rounds; plus the server-side round time (send to last reply).

``breakdown`` splits the worker run's steady-state overhead with the timings each ClientApp
process logs (``[fedtune] client timing {...}`` in the SuperNodes' logs: its age when clients.app
was loaded and when its handler was entered, the hand-off's parts) and with direct measurements
in fresh processes: the interpreter, Flower's ``flwr-clientapp`` imports, ``import clients.app``
on top of them, and installing the app bundle (FAB) as every ClientApp process does, for the
bundle without and with pyproject's ``fab-exclude``. ``floor`` runs a ClientApp that replies at
once (Flower only, no fedtune import) through the same topology: its process age at the reply is
the least a per-message process costs; it runs with Flower's SuperExec task poll (1 s) and with
fedtune's (``fedtune.deploy.processes.SUPEREXEC_POLL_S``), whose difference shows in round time.

    .venv/bin/python simulations/bench/deploy_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TIMING_PREFIX = "[fedtune] client timing "

FLOOR_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "floorapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "floorapp:server"
clientapp = "floorapp:client"

[tool.flwr.app.config]
rounds = 4
nodes = 3
out = ""
"""

FLOOR_APP = '''\
"""A ClientApp that replies at once (Flower only), and a ServerApp that times rounds of it."""
import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


def process_age_s() -> float:
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return time.time() - boot - ticks / os.sysconf("SC_CLK_TCK")


@client.train()
def train(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"process_s": process_age_s(), "process_cpu_s": time.process_time()})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, nodes = int(rc["rounds"]), int(rc["nodes"])
    deadline = time.time() + 120
    while len(ids := sorted(grid.get_node_ids())) < nodes and time.time() < deadline:
        time.sleep(0.5)
    rows = []
    for rnd in range(1, rounds + 1):
        msgs = [Message(RecordDict({"config": ConfigRecord({"round": rnd})}), dst_node_id=n, message_type="train")
                for n in ids]
        t0 = time.time()
        replies = list(grid.send_and_receive(msgs, timeout=120))
        rows.append({"round": rnd, "round_s": time.time() - t0,
                     "process_s": [float(m.content["metrics"]["process_s"]) for m in replies if m.has_content()],
                     "process_cpu_s": [float(m.content["metrics"]["process_cpu_s"]) for m in replies
                                       if m.has_content()]})
    Path(str(rc["out"])).write_text(json.dumps(rows))
'''


def _mean(values: list[float]) -> float:
    return round(statistics.mean(values), 4) if values else float("nan")


def measure(worker: bool, rounds: int, out: Path) -> dict:
    import dataclasses

    from fedtune.core.config import load_config
    from fedtune.deploy.processes import deploy

    cfg = load_config(ROOT / "simulations" / "deploy.toml")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, num_rounds=rounds))
    t0 = time.time()
    status, _ = deploy(cfg, out / "run", out / "deployment", worker=worker, say=lambda s: print(s, flush=True))
    if status != "finished:completed":
        raise SystemExit(f"deployment run ended {status}; logs in {out / 'deployment' / 'logs'}")
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [(r["round"], c) for r in records for c in r["clients"] if c["status"] == "ok"]
    steady = [c["process_s"] - c["train_time_s"] for rnd, c in rows if rnd > 1]
    every = [c["process_s"] - c["train_time_s"] for _, c in rows]
    round_s = [max(c["reply_s"] for c in r["clients"]) for r in records if r["clients"]]
    return {
        "client_overhead_s": round(statistics.mean(steady), 3),
        "client_overhead_s_all_rounds": round(statistics.mean(every), 3),
        "train_time_s": round(statistics.mean(c["train_time_s"] for _, c in rows), 3),
        "setup_s_per_round": [round(statistics.mean(c.get("setup_s", 0.0) for rnd, c in rows if rnd == k), 3)
                              for k in range(1, rounds + 1)],
        "round_s_steady": round(statistics.mean(round_s[1:]), 3),
        "round_s_per_round": [round(x, 3) for x in round_s],
        "client_rounds": len(rows), "wall_s": round(time.time() - t0, 1),
        "timings": client_timings(out / "deployment" / "logs"),
        "train_time_s_steady": _mean([c["train_time_s"] for rnd, c in rows if rnd > 1]),
    }


def client_timings(logs: Path) -> list[dict]:
    """The ``[fedtune] client timing`` lines the ClientApp processes wrote to the SuperNodes' logs."""
    found = []
    for log in sorted(logs.glob("supernode-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if TIMING_PREFIX in line:
                found.append(json.loads(line.split(TIMING_PREFIX, 1)[1]))
    return found


def breakdown(run: dict, direct: dict) -> dict:
    """The worker run's steady-state client-round overhead, part by part (means over rounds > 1)."""
    rows = [t for t in run["timings"] if t.get("op") == "train" and (t.get("round") or 0) > 1]
    if not rows:
        return {"error": "no client timing lines in the SuperNodes' logs"}

    def m(key: str) -> float:
        return _mean([t[key] for t in rows if isinstance(t.get(key), (int, float))])

    loaded, fab = m("app_loaded_s"), direct["fab_after"]["install_s"]
    start = direct["interpreter_s"] + direct["flwr_clientapp_imports_s"]
    exchange_wire = m("exchange_s") - m("worker_read_s") - m("worker_handle_s") - m("worker_encode_s")
    cpu_parts = {"interpreter": direct["interpreter_cpu_s"], "flwr_clientapp_imports": direct["flwr_clientapp_imports_cpu_s"],
                 "fab_install": direct["fab_after"]["install_cpu_s"], "import_clients_app": direct["import_clients_app_cpu_s"]}
    return {
        "client_rounds": len(rows),
        "process_s": m("process_s"),
        "process_cpu_s": m("process_cpu_s"),
        "process_cpu_parts_s (direct)": {**cpu_parts, "rest (remainder)": round(m("process_cpu_s") - sum(cpu_parts.values()), 4)},
        "app_loaded_s": loaded,
        "of_which_interpreter_s (direct)": direct["interpreter_s"],
        "of_which_flwr_clientapp_imports_s (direct)": direct["flwr_clientapp_imports_s"],
        "of_which_fab_install_s (direct)": fab,
        "of_which_import_clients_app_s (direct)": direct["import_clients_app_s"],
        "of_which_connect_and_pull_task_s (remainder)": round(loaded - start - fab - direct["import_clients_app_s"], 4),
        "load_to_handler_s": round(m("handler_s") - loaded, 4),
        "handoff_s": m("handoff_s"),
        "handoff_parts_s": {"encode_request": m("encode_s"), "connect": m("connect_s"),
                            "worker_read_decode": m("worker_read_s"), "socket_wait": round(exchange_wire, 4),
                            "worker_encode": m("worker_encode_s"), "receive_decode_reply": m("receive_s")},
        "worker_handler_s": m("worker_handle_s"),
        "train_time_s": run["train_time_s_steady"],
        "reply_building_s": round(m("process_s") - m("handler_s") - m("total_s"), 4),
        "note": "process_s - train_time_s is the client overhead; app_loaded_s is the process's age when clients.app"
                " was imported; the 'direct' parts are measured in fresh processes on this machine in the same"
                " script run, the connection/pull part is what remains. process_cpu_s is the ClientApp process's"
                " CPU seconds at its reply (the worker's training runs in the worker, not in it): what the process"
                " costs whatever else the machine runs. The reply push happens after process_s.",
    }


def _whole_process(code: str, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (user + system) seconds of a fresh ``python -c code`` process."""
    import resource

    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def _inside(code: str, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds that ``code`` takes inside a fresh process that has already
    imported ``flwr-clientapp``'s modules (as a ClientApp process has when it loads the app)."""
    timed = ("import time; from flwr.supernode.cli import flwr_clientapp; w, c = time.perf_counter(), "
             f"time.process_time(); {code}; print(time.perf_counter() - w, time.process_time() - c)")
    out = [subprocess.run([sys.executable, "-c", timed], check=True, cwd=ROOT, capture_output=True,
                          text=True).stdout.split()[-2:] for _ in range(repeats)]
    return statistics.median(float(w) for w, _ in out), statistics.median(float(c) for _, c in out)


def fab_costs(repeats: int) -> dict:
    """The app bundle without and with pyproject's ``[tool.flwr.app]`` ``fab-exclude``: size, files,
    and the seconds ``install_from_fab`` takes in a ClientApp process once the app is installed."""
    import io
    import tomllib
    import zipfile

    import tomli_w
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.install import install_from_fab

    from fedtune.deploy.processes import app_files

    files = app_files(ROOT)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project["tool"]["flwr"]["app"].pop("fab-exclude", None)
    project["tool"]["flwr"]["app"].pop("fab-include", None)
    variants = {"fab_before": {**files, "pyproject.toml": tomli_w.dumps(project).encode()}, "fab_after": files}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variants.items():
            fab = build_fab_from_files(variant)[0]
            install_from_fab(fab, install_dir=Path(tmp), skip_prompt=True)  # what the first process does
            walls, cpus = [], []
            for _ in range(repeats):
                w, c = time.perf_counter(), time.process_time()
                install_from_fab(fab, install_dir=Path(tmp), skip_prompt=True)
                walls.append(time.perf_counter() - w)
                cpus.append(time.process_time() - c)
            out[name] = {"bytes": len(fab), "files": len(zipfile.ZipFile(io.BytesIO(fab)).namelist()),
                         "install_s": round(statistics.median(walls), 4),
                         "install_cpu_s": round(statistics.median(cpus), 4)}
    return out


def direct_costs(repeats: int = 5) -> dict:
    """Fresh-process costs on the ClientApp's path, each the median of ``repeats``: wall seconds
    (``*_s``) and CPU seconds (``*_cpu_s``, what they cost whatever else the machine runs)."""
    interp, flwr = _whole_process("pass", repeats), _whole_process("from flwr.supernode.cli import flwr_clientapp",
                                                                   repeats)
    app, config = _inside("import clients.app", repeats), _inside("import fedtune.core.config", repeats)
    worker = _inside("import clients.app; w, c = time.perf_counter(), time.process_time(); import clients.worker",
                     repeats)
    parts = {"interpreter": interp, "flwr_clientapp_imports": (flwr[0] - interp[0], flwr[1] - interp[1]),
             "import_clients_app": app, "of_which_fedtune_core_config": config, "import_clients_worker": worker}
    out = {}
    for name, (wall, cpu) in parts.items():
        out.update({f"{name}_s": round(wall, 4), f"{name}_cpu_s": round(cpu, 4)})
    return {**out, **fab_costs(repeats)}


def measure_floor(rounds: int, nodes: int, out: Path, poll_s: str) -> dict:
    """Rounds of a reply-at-once ClientApp on SuperLink + ``nodes`` SuperNodes (TLS, auth), the
    SuperExec polling for tasks every ``poll_s`` seconds."""
    from fedtune.deploy.processes import LocalDeployment, NodeSpec

    app = out / "floorapp"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(FLOOR_PYPROJECT)
    (app / "floorapp.py").write_text(FLOOR_APP)
    result = out / "floor.json"
    specs = [NodeSpec(i, nodes, worker=False) for i in range(nodes)]
    with LocalDeployment(out / "deployment", specs, env_extra={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll_s}) as dep:
        run_id = dep.start_run({"rounds": rounds, "nodes": nodes, "out": str(result)}, app_dir=app)
        deadline, status = time.time() + 600, "unknown"
        while time.time() < deadline and not (status := dep.status(run_id)).startswith("finished"):
            time.sleep(1.0)
    if status != "finished:completed" or not result.is_file():
        raise SystemExit(f"floor run ended {status}; logs in {out / 'deployment' / 'logs'}")
    rows = json.loads(result.read_text())
    steady = [r for r in rows if r["round"] > 1]
    return {
        "superexec_poll_s": float(poll_s),
        "process_s": _mean([p for r in steady for p in r["process_s"]]),
        "process_cpu_s": _mean([p for r in steady for p in r["process_cpu_s"]]),
        "round_s": _mean([r["round_s"] for r in steady]),
        "round_s_minus_process_s": _mean([r["round_s"] - max(r["process_s"]) for r in steady]),
        "round_s_per_round": [round(r["round_s"], 3) for r in rows],
    }


def main() -> None:
    from fedtune.deploy.processes import SUPEREXEC_POLL_S

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per direct measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "deploy_overhead.json")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = ROOT / "runs"
    load_start = os.getloadavg()
    direct = direct_costs(args.repeats)
    print(json.dumps(direct, indent=2), flush=True)
    floor = {f"poll_{poll}s": measure_floor(args.rounds, 3, runs / f"bench-deploy-floor-{poll}-{stamp}", poll)
             for poll in ("1.0", SUPEREXEC_POLL_S)}
    print(json.dumps(floor, indent=2), flush=True)
    before = measure(False, args.rounds, runs / f"bench-deploy-before-{stamp}")
    after = measure(True, args.rounds, runs / f"bench-deploy-after-{stamp}")
    parts = breakdown(after, direct)
    for run in (before, after):
        run.pop("timings")
    result = {
        "client_overhead_s_before": before["client_overhead_s"],
        "client_overhead_s_after": after["client_overhead_s"],
        "overhead_ratio_before_over_after": round(before["client_overhead_s"] / after["client_overhead_s"], 2),
        "round_s_before": before["round_s_steady"], "round_s_after": after["round_s_steady"],
        "before": before, "after": after,
        "breakdown": {**parts, "direct": direct},
        "floor": floor,
        "setup": "fedtune deploy: SuperLink + 3 SuperNodes as processes on 127.0.0.1, TLS + SuperNode auth,"
                 " simulations/deploy.toml (tiny-bert, FedSpine); before = per-message ClientApp processes"
                 " (--no-worker), after = persistent per-node worker (default); floor = a reply-at-once"
                 " ClientApp on the same topology; all in one run of this script",
        "command": "python simulations/bench/deploy_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_start],
                                    "end": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
