"""Scale: memory and round time as the number of registered virtual clients grows.

Runs ``fedtune simulate`` on Flower's Ray simulation engine once per size, back to back in one
invocation, with 10 clients sampled a round, 3 rounds and 2 workers (one CPU each):

- MiniLM (the default experiment's model, Rotten Tomatoes, IID shards so that 1,000 clients
  all get data) at 100, 300 and 1,000 clients, with short local work (5 steps of 8 examples,
  32 tokens) and a held-out set of 200 examples;
- the tiny model of ``simulations/smoke.toml`` (the whole corpus) at 100 and 10,000 clients.

Only the sampled clients do any work, so with memory and server cost that do not depend on the
clients that are not sampled, every size should take about as long and hold about as much
memory. Per size the result records:

- ``peak_rss_gb``: the peak, over samples every 0.5 s, of the summed resident memory of every
  process of the run: the ``fedtune simulate`` process and all its descendants (Ray's GCS,
  raylet and worker processes are started by it, the workers by the raylet), plus any process
  whose environment carries the run's own ``RAY_TMPDIR`` (each run gets a fresh one), in case
  Ray re-parents one. ``peak_pss_gb`` is the same sum in proportional set size, which counts
  pages shared between processes (libraries, the copy-on-write model) once; the RSS sum counts
  them in every process, so it is the conservative figure. ``cli_cpu_s`` is the CPU time of the
  ``fedtune simulate`` process itself (the server and Flower's simulation engine threads), and
  ``cli_busiest_thread_cpu_s`` that of its busiest thread.
- ``round_wall_s``: per round, the difference of ``wall_time_s`` in ``metrics.jsonl``; round 1
  is measured from the round-0 record (written after the round-0 evaluation), so it includes the
  first sampling (with the server numbering the virtual nodes) and every worker's first model and
  data load.
- ``server_round_s``: the round's wall time minus the longest ``reply_s`` of its clients, which
  runs from the server building that client's message to the server reading its reply; what is
  left is the server's own work: sampling, decoding the global adapter, aggregation, records,
  the held-out evaluation, the checkpoint and the metrics line (``server_round_ex_eval_s``
  subtracts the evaluation, which does not depend on the number of clients). The mean over the
  rounds; the per-round values are beside it.
- ``round_cpu_s``: per round, the CPU seconds all the run's processes used between the progress
  lines of the round before and of this one (sampled every 0.5 s), and ``round_cli_cpu_s`` those
  of the ``fedtune simulate`` process alone. CPU time changes much less than wall time when other
  jobs share the machine, so it is the steadier figure for what grows with the client count.
- ``setup_s``: from the launch of the command to the run's start line (imports, the config
  checks, which look at every client's partition, Ray's start, Flower's registration of the
  virtual nodes and the server's model and data load). ``data_setup_s`` is measured in this
  process for the same config: loading and partitioning the corpus and checking that no
  partition is empty, from the partitioner's index table; ``data_load_every_partition_s``
  is the same check done by building every client's partition as a ``Dataset``, which is what
  grows with the client count when it is done that way. ``client_setup_s_max`` is the longest
  model-and-partition load a client reported (a worker's first load of the corpus).

What grew with the client count was Flower's: its simulation engine hands messages to the
workers from a thread (``add_messages_to_queue`` in ``flwr.server.superlink.fleet.vce.vce_api``)
that asks the link state every 0.1 s for a message for every registered node in turn, and each
ask scans every stored message; its work grows with the number of nodes times the messages in
flight, in the server's process and under its interpreter lock. fedtune replaces that thread
during a simulation by one that visits only the nodes with an undelivered message
(``simulation.dispatch = "pending"``, the default; :mod:`fedtune.engine.dispatch`). Every size
runs with the default; ``--flower-dispatch MODEL:N,...`` also runs the listed sizes with
``simulation.dispatch = "flower"`` (Flower's thread as it is); those runs carry
``"dispatch": "flower"``, and their ratios (under ``flower_dispatch``) are taken against the
100-client run with the same dispatch when there is one, else the default's.

Machines shared with other jobs make single timings noisy; the sizes run back to back, and the
ratios against the 100-client run of the same model are the figures to compare.

    .venv/bin/python simulations/bench/scale.py [--out simulations/results/scale.json]
        [--minilm-clients 100,300,1000] [--tiny-clients 100,10000] [--rounds 3]
        [--flower-dispatch tiny-bert:100,tiny-bert:10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GB = 1024 ** 3
START_LINE = re.compile(r"^\[fedtune\] .+ clients, strategy ")
ROUND_LINE = re.compile(r"^\[fedtune\] round\s+(\d+)/")

MODELS: dict[str, dict[str, Any]] = {
    "minilm": {
        "config": "simulations/default.toml",
        "overrides": ["data.partitioner=iid", "data.partitioner_args={}", "model.max_length=32",
                      "train.batch_size=8", "data.eval_size=200"],
    },
    "tiny-bert": {
        "config": "simulations/smoke.toml",
        "overrides": ["data.max_examples=0"],
    },
}


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryMonitor:
    """Samples the summed RSS and PSS of a run's processes every ``interval`` seconds (see the
    module docstring for which processes count)."""

    def __init__(self, root_pid: int, ray_tmpdir: str, started: float, interval: float = 0.5) -> None:
        self.root_pid, self.ray_tmpdir, self.started, self.interval = root_pid, ray_tmpdir, started, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs: list[str] = []
        self.seen: dict[tuple[int, float], str] = {}  # (pid, start time) -> how it was found
        self.samples = 0
        self.cli_cpu_s = 0.0  # CPU seconds of the ``fedtune simulate`` process (server and Flower's engine)
        self.cli_busiest_thread_cpu_s = 0.0
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> its latest CPU seconds
        self.history: list[tuple[float, float, float]] = []  # (seconds since launch, all CPU s, CLI CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-memory", daemon=True)

    def start(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def processes(self) -> list[Any]:
        import psutil

        found: dict[int, Any] = {}
        try:
            root = psutil.Process(self.root_pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
                self.seen.setdefault((p.pid, p.create_time()), "descendant")
        except psutil.Error:
            pass
        for p in psutil.process_iter(["create_time"]):
            if p.pid in found or p.info["create_time"] is None or p.info["create_time"] < self.started - 1:
                continue
            key = (p.pid, p.info["create_time"])
            if key not in self.seen:
                try:
                    mine = p.environ().get("RAY_TMPDIR") == self.ray_tmpdir
                except psutil.Error:
                    mine = False
                self.seen[key] = "ray_tmpdir" if mine else ""
            if self.seen[key] == "ray_tmpdir":
                found[p.pid] = p
                for child in _children(p):
                    found.setdefault(child.pid, child)
        return list(found.values())

    def sample(self) -> None:
        import psutil

        rss = pss = 0
        names = []
        try:
            root = psutil.Process(self.root_pid)
            cpu = root.cpu_times()
            self.cli_cpu_s = cpu.user + cpu.system
            self.cli_busiest_thread_cpu_s = max((t.user_time + t.system_time for t in root.threads()), default=0.0)
        except psutil.Error:
            pass
        for p in self.processes():
            try:
                rss += p.memory_info().rss
                names.append(p.name())
                cpu = p.cpu_times()
                self._cpu[(p.pid, p.create_time())] = cpu.user + cpu.system
            except psutil.Error:
                continue
            pss += _pss_bytes(p.pid)
        self.history.append((time.time() - self.started, sum(self._cpu.values()), self.cli_cpu_s))
        self.samples += 1
        self.peak_pss = max(self.peak_pss, pss)
        if rss > self.peak_rss:
            self.peak_rss, self.peak_procs = rss, sorted(names)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def cpu_at(self, t: float) -> tuple[float, float]:
        """(all processes', CLI process's) CPU seconds at ``t`` seconds after launch (the last
        sample before it)."""
        before = [h for h in self.history if h[0] <= t]
        last = before[-1] if before else (0.0, 0.0, 0.0)
        return last[1], last[2]

    def found_by_tmpdir_only(self) -> int:
        return sum(1 for how in self.seen.values() if how == "ray_tmpdir")


def _children(p: Any) -> list[Any]:
    try:
        return p.children(recursive=True)
    except Exception:  # noqa: BLE001 - a process that ended
        return []


def measure_data_setup(cfg: Any) -> dict[str, float]:
    """Corpus load, partitioning and the empty-partition check, in this process."""
    import datasets  # noqa: F401 - imported before the clock starts
    import flwr_datasets.partitioner  # noqa: F401

    from fedtune.data.partition import FederatedData

    t0 = time.perf_counter()
    fed = FederatedData(cfg.data, cfg.model.task, cfg.federation.num_clients, cfg.seed, cfg.model.num_labels)
    empty = fed.empty_partitions()
    t1 = time.perf_counter()
    every = [len(fed.partition(cid)) for cid in range(cfg.federation.num_clients)]
    t2 = time.perf_counter()
    assert every == fed.partition_sizes(), "partition sizes disagree with the partitions"
    return {"data_setup_s": round(t1 - t0, 3), "data_load_every_partition_s": round(t2 - t1, 3),
            "empty_partitions": len(empty), "min_partition_size": min(every)}


def run_size(model: str, num_clients: int, args: argparse.Namespace, work: Path, index: int,
             dispatch: str = "pending") -> dict[str, Any]:
    """One ``fedtune simulate`` run of ``model`` with ``num_clients`` clients and
    ``simulation.dispatch = dispatch``, measured."""
    from fedtune.core.config import config_from_dict, read_toml

    spec = MODELS[model]
    tag = f"{model}-{num_clients}" + ("-flower" if dispatch == "flower" else "")
    ray_tmpdir = f"/tmp/fts{os.getpid()}-{index}"  # short: Ray's socket paths
    launcher = [sys.executable, "-m", "fedtune.cli"]
    out = work / tag
    overrides = [*spec["overrides"], f"federation.num_clients={num_clients}",
                 f"federation.clients_per_round={args.per_round}", f"federation.num_rounds={args.rounds}",
                 "simulation.num_cpus_per_client=1", f"simulation.ray_tmpdir={ray_tmpdir}",
                 f'simulation.dispatch="{dispatch}"']
    if model == "minilm":
        overrides.append(f"train.local_steps={args.local_steps}")
    cfg = config_from_dict(read_toml(ROOT / spec["config"], "config"), overrides)
    data = measure_data_setup(cfg)

    cmd = [*launcher, "simulate", "--config", spec["config"], "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_TMPDIR": ray_tmpdir}
    print(f"[scale] {tag}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monitor = MemoryMonitor(proc.pid, ray_tmpdir, started).start()
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time() - started, line.rstrip("\n")))
            print(f"[scale] {tag} {lines[-1][0]:7.1f}s | {lines[-1][1]}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        proc.terminate()  # the CLI stops the run in order on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = time.time() - started
    monitor.stop()
    reader.join(timeout=10)
    leftovers = [p for p in monitor.processes() if p.pid != proc.pid]
    for p in leftovers:  # Ray processes of this run (matched by its RAY_TMPDIR) that outlived it
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    shutil.rmtree(ray_tmpdir, ignore_errors=True)  # this run's own Ray session files
    if proc.returncode != 0 and status == "ok":
        status = f"exit {proc.returncode}"
    (work / f"{tag}.log").write_text("\n".join(f"{t:8.2f} {s}" for t, s in lines) + "\n")

    metrics_path = out / "metrics.jsonl"
    records = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    walls = [r["wall_time_s"] for r in records]
    round_wall = [round(b - a, 3) for a, b in zip(walls, walls[1:])]
    server, server_ex_eval, reply_max, train_max = [], [], [], []
    for rec, wall in zip(records[1:], round_wall):
        replies = [c["reply_s"] for c in rec["clients"] if c.get("reply_s") is not None]
        slowest = max(replies, default=0.0)
        server.append(round(wall - slowest, 3))
        server_ex_eval.append(round(wall - slowest - rec.get("eval_time_s", 0.0), 3))
        reply_max.append(slowest)
        train_max.append(max((c.get("train_time_s") or 0.0 for c in rec["clients"]), default=0.0))
    client_setup = [c["setup_s"] for r in records[1:] for c in r["clients"] if c.get("setup_s") is not None]
    start_line = next((t for t, s in lines if START_LINE.match(s)), None)
    round_lines = {int(m.group(1)): t for t, s in lines if (m := ROUND_LINE.match(s))}
    round_cpu, round_cli_cpu = [], []
    for rnd in range(1, len(round_wall) + 1):
        if rnd in round_lines and rnd - 1 in round_lines:
            (a_all, a_cli), (b_all, b_cli) = monitor.cpu_at(round_lines[rnd - 1]), monitor.cpu_at(round_lines[rnd])
            round_cpu.append(round(b_all - a_all, 2))
            round_cli_cpu.append(round(b_cli - a_cli, 2))

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 3) if xs else None

    return {
        "model": model, "num_clients": num_clients, "dispatch": dispatch, "status": status,
        "rounds_done": len(round_wall),
        "peak_rss_gb": round(monitor.peak_rss / GB, 3),
        "peak_pss_gb": round(monitor.peak_pss / GB, 3),
        "round_wall_s": round_wall,
        "round_wall_mean_s": mean(round_wall),
        "round1_s": round_wall[0] if round_wall else None,
        "round_wall_steady_mean_s": mean(round_wall[1:]),
        "server_round_s": mean(server),
        "server_round_s_per_round": server,
        "server_round_ex_eval_s": mean(server_ex_eval),
        "slowest_reply_s_per_round": reply_max,
        "slowest_train_s_per_round": train_max,
        "round_cpu_s": round_cpu,
        "round_cpu_mean_s": mean(round_cpu),
        "round_cli_cpu_s": round_cli_cpu,
        "setup_s": round(start_line, 3) if start_line is not None else None,
        **data,
        "client_setup_s_max": round(max(client_setup), 3) if client_setup else None,
        "sampled_clients": sorted({c["client_id"] for r in records[1:] for c in r["clients"]}),
        "total_s": round(total, 3),
        "cli_cpu_s": round(monitor.cli_cpu_s, 1),
        "cli_busiest_thread_cpu_s": round(monitor.cli_busiest_thread_cpu_s, 1),
        "memory": {"samples": monitor.samples, "processes_at_peak": len(monitor.peak_procs),
                   "process_names_at_peak": sorted(set(monitor.peak_procs)),
                   "found_by_ray_tmpdir_only": monitor.found_by_tmpdir_only(),
                   "leftover_processes_killed": len(leftovers)},
    }


def _ratio(runs: list[dict[str, Any]], model: str, n: int, base: int, key: str = "round_wall_mean_s",
           dispatch: str = "pending") -> float | None:
    """``key`` of the ``n``-client run with ``dispatch`` over that of the ``base``-client run with the
    same dispatch (the default's when that size ran only with the default)."""
    def find(size: int, variant: str) -> dict[str, Any] | None:
        return next((r for r in runs if r["model"] == model and r["num_clients"] == size
                     and r["dispatch"] == variant and r["status"] == "ok"), None)

    top, bottom = find(n, dispatch), find(base, dispatch) or find(base, "pending")
    if top is None or bottom is None or not bottom.get(key) or top.get(key) is None:
        return None
    return round(top[key] / bottom[key], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "scale.json")
    ap.add_argument("--minilm-clients", default="100,300,1000", help="comma-separated sizes ('' for none)")
    ap.add_argument("--tiny-clients", default="100,10000", help="comma-separated sizes ('' for none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=10, help="clients sampled a round")
    ap.add_argument("--local-steps", type=int, default=5, help="MiniLM local steps")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is stopped")
    ap.add_argument("--flower-dispatch", default="tiny-bert:100,tiny-bert:10000",
                    help="MODEL:N sizes to run again with Flower's own dispatch thread ('' for none)")
    ap.add_argument("--keep", type=Path, help="keep the run directories and logs here")
    args = ap.parse_args()

    from fedtune.engine.simulation import quiet_library_warnings

    quiet_library_warnings()
    sizes = [("minilm", int(n)) for n in args.minilm_clients.split(",") if n.strip()]
    sizes += [("tiny-bert", int(n)) for n in args.tiny_clients.split(",") if n.strip()]
    variants = [(model, n, "pending") for model, n in sizes]
    for item in (x.strip() for x in args.flower_dispatch.split(",") if x.strip()):
        model, _, n = item.partition(":")
        if model not in MODELS or not n.isdigit():
            ap.error(f"--flower-dispatch: expected MODEL:N with MODEL in {sorted(MODELS)}, got {item!r}")
        variants.append((model, int(n), "flower"))
    work = Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    load_before = os.getloadavg()
    runs = []
    try:
        for index, (model, n, dispatch) in enumerate(variants):
            runs.append(run_size(model, n, args, work, index, dispatch))
            print(f"[scale] {json.dumps({k: v for k, v in runs[-1].items() if k != 'sampled_clients'})}", flush=True)
    finally:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    minilm_1000 = next((r for r in runs if r["model"] == "minilm" and r["num_clients"] == 1000
                        and r["dispatch"] == "pending"), None)
    result: dict[str, Any] = {
        "round_wall_ratio_1000_vs_100": _ratio(runs, "minilm", 1000, 100),
        "round1_wall_ratio_1000_vs_100": _ratio(runs, "minilm", 1000, 100, "round1_s"),
        "peak_rss_gb_1000": minilm_1000["peak_rss_gb"] if minilm_1000 else None,
        "round_wall_ratio_10000_vs_100_tiny": _ratio(runs, "tiny-bert", 10000, 100),
        "round1_wall_ratio_10000_vs_100_tiny": _ratio(runs, "tiny-bert", 10000, 100, "round1_s"),
        "round_cpu_ratio_1000_vs_100": _ratio(runs, "minilm", 1000, 100, "round_cpu_mean_s"),
        "round_cpu_ratio_10000_vs_100_tiny": _ratio(runs, "tiny-bert", 10000, 100, "round_cpu_mean_s"),
        "flower_dispatch": {
            "round_wall_ratio_1000_vs_100": _ratio(runs, "minilm", 1000, 100, dispatch="flower"),
            "round_wall_ratio_10000_vs_100_tiny": _ratio(runs, "tiny-bert", 10000, 100, dispatch="flower"),
            "round_cpu_ratio_1000_vs_100": _ratio(runs, "minilm", 1000, 100, "round_cpu_mean_s", "flower"),
            "round_cpu_ratio_10000_vs_100_tiny": _ratio(runs, "tiny-bert", 10000, 100, "round_cpu_mean_s",
                                                        "flower"),
        },
        "runs": runs,
    }
    result["goals"] = {
        "minilm_1000_peak_rss_under_8gb": None if minilm_1000 is None else minilm_1000["peak_rss_gb"] < 8.0,
        "minilm_1000_round_wall_within_1.2x": None if result["round_wall_ratio_1000_vs_100"] is None
        else result["round_wall_ratio_1000_vs_100"] <= 1.2,
        "tiny_10000_round_wall_within_1.5x": None if result["round_wall_ratio_10000_vs_100_tiny"] is None
        else result["round_wall_ratio_10000_vs_100_tiny"] <= 1.5,
    }
    result["setup"] = {"rounds": args.rounds, "clients_per_round": args.per_round, "workers": 2,
                       "num_cpus_per_client": 1, "minilm_local_steps": args.local_steps,
                       "overrides": {m: s["overrides"] for m, s in MODELS.items()}}
    result["command"] = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    result["machine"] = {"platform": platform.platform(), "nproc": os.cpu_count(), "python": platform.python_version(),
                         "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)]}
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip()
    result["date"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
