"""Real Ray simulations of the tiny model through the CLI (marked ``integration``)."""

import json
import math
import os
import subprocess
import sys
import tomllib

import pytest
import torch

from fedtune.deploy.processes import free_port
from fedtune.round.checkpoint import has_checkpoint, read_checkpoint_meta
from tests.conftest import ROOT, stop_ray_under

pytestmark = pytest.mark.integration
SMOKE = ROOT / "simulations" / "smoke.toml"


RAY = {}  # the session's shared Ray cluster (tests/conftest.py::shared_ray)


@pytest.fixture(autouse=True)
def _attach_to_shared_ray(shared_ray):
    RAY["address"] = shared_ray


def run_cli(*args, timeout=400):
    """``python -m fedtune ARGS``; a simulation attaches to the session's Ray cluster (a ``--set``
    of ``simulation.ray_address`` later in ARGS overrides it)."""
    env = {**os.environ, "RAY_TMPDIR": "/tmp/fedtune-ray-test", "PYTHONUNBUFFERED": "1"}
    args = list(args)
    if args[:1] == ["simulate"] and RAY.get("address"):
        args[1:1] = ["--set", f'simulation.ray_address="{RAY["address"]}"']
    proc = subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def test_smoke_simulation_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(out), "--set", "outputs.tensorboard=true",
                   "--set", "outputs.adapter_every=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[fedtune] round   2/2" in proc.stdout  # per-round progress
    run_log = (out / "run.log").read_text()  # the same lines, and each client's at DEBUG
    assert "INFO    fedtune.round: round   2/2 | clients 4/4 ok" in run_log
    assert "DEBUG   fedtune.round: round 2: client 3:" in run_log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 1, 2]
    assert sorted(p.name for p in (out / "adapter").glob("round-*")) == ["round-2"]
    from safetensors.torch import load_file

    final, round_2 = (load_file(out / "adapter" / d / "adapter_model.safetensors") for d in (".", "round-2"))
    assert final.keys() == round_2.keys() and all(torch.equal(final[k], round_2[k]) for k in final)  # the last round

    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["model"]["name"] == "tiny-bert" and cfg["federation"]["num_clients"] == 4

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    for rec in lines:
        for key in ("round", "wall_time_s", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "clients"):
            assert key in rec
    for rec in lines[1:]:
        assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0
        assert len(rec["clients"]) == 4
        for c in rec["clients"]:
            assert c["status"] == "ok" and c["num_examples"] > 0 and c["train_loss"] > 0
        assert {c["rank"] for c in rec["clients"]} == {2, 4}
        assert {c["client_id"] for c in rec["clients"]} == {0, 1, 2, 3}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "HetLoRA"
    assert (out / "metrics.png").stat().st_size > 1000

    # the exported adapter is a standard PEFT adapter that reproduces the server's evaluation
    from peft import PeftModel

    from fedtune.core.config import load_config
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import load_base_model

    exp = load_config(out / "config.toml")
    base = load_base_model(exp.model, exp.seed)
    model = PeftModel.from_pretrained(base.model, str(out / "adapter")).eval()
    fed = cached_federated_data(exp.data, exp.model.task, exp.federation.num_clients, exp.seed, exp.model.num_labels)
    ev = tokenize(fed.eval, base.tokenizer, "classification", exp.model.max_length)
    correct = 0
    with torch.no_grad():
        for ids, label in zip(ev.input_ids, ev.labels):
            logits = model(input_ids=torch.tensor([ids])).logits
            correct += int(logits.argmax(-1).item() == label)
    assert correct / len(ev) == pytest.approx(lines[-1]["eval_accuracy"])


PLUGIN = '''
"""A user's strategy, outside the package: plain mean of the zero-padded products' factors.
It also sends client 0 a payload of the wrong rank, so that client crashes every round."""
import torch
from fedtune.lora.factors import pad_factors
from strategies import LoraStrategy


class PaddedMean(LoraStrategy):
    def aggregate_adapters(self, updates, current):
        out = {}
        for m in updates[0].factors:
            padded = [pad_factors(*u.factors[m], self.global_rank) for u in updates]
            out[m] = (sum(a for a, _ in padded) / len(padded), sum(b for _, b in padded) / len(padded))
        return out

    def client_payload(self, state, client_id, rank):
        payload = super().client_payload(state, client_id, rank)
        if client_id == 0:
            payload.adapter = {m: (a[:1], b[:, :1]) for m, (a, b) in payload.adapter.items()}
        return payload
'''


def test_plugin_strategy_from_a_file_and_a_crashing_client(tmp_path):
    plugin = tmp_path / "elsewhere" / "my_strategy.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(out), "--strategy", f"{plugin}:PaddedMean",
                   "--set", "federation.num_rounds=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "PaddedMean" and summary["rounds"] == 1
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    status = {c["client_id"]: c for c in last["clients"]}
    assert status[0]["status"] == "failed" and "payload adapter rank 1 != assigned rank 2" in status[0]["reason"]
    assert all(status[c]["status"] == "ok" for c in (1, 2, 3))


def test_a_stopped_server_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = run_cli("simulate", "--config", str(SMOKE), "--out", str(out), "--set", "federation.num_rounds=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert read_checkpoint_meta(out / "checkpoint")["round"] == 1
    second = run_cli("simulate", "--config", str(SMOKE), "--out", str(out), "--resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from checkpoint after round 1" in second.stdout
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_clients_prune_while_training_and_export_their_models(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(out), "--set", "prune.ratio=0.5",
                   "--set", "prune.interval=1", "--set", 'prune.ratio_overrides={"3" = 0.25}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    r1 = {c["client_id"]: c for c in lines[1]["clients"]}
    r2 = {c["client_id"]: c for c in lines[2]["clients"]}
    for cid in (0, 1, 2):
        assert 0.4 < r1[cid]["prune_ratio"] <= r2[cid]["prune_ratio"] < 0.6
    assert 0.15 < r2[3]["prune_ratio"] < 0.35
    from fedtune.pruning.export import load_pruned_model

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["client_models"]) == {"0", "1", "2", "3"}
    model = load_pruned_model(out / "clients" / "0" / "model")
    assert sum(p.numel() for p in model.parameters()) == summary["client_models"]["0"]["params_after"]
    assert summary["client_models"]["0"]["params_after"] < summary["client_models"]["3"]["params_after"]


def test_fedspine_on_a_fleet_smoke(tmp_path):
    """simulations/fleet_smoke.toml: 10 devices of 3 classes, S-UCB picks rank and ratio per client;
    TX2s train on an NF4 base, Xavier NXs on int8 (bitsandbytes' CPU backend), AGXs in fp32. In the
    last round every available device evaluates the global adapter on its own held-out split."""
    out = tmp_path / "run"
    proc = run_cli("simulate", "--config", str(ROOT / "simulations" / "fleet_smoke.toml"), "--out", str(out),
                   "--set", 'model.quantization_by_device.jetson-tx2="nf4"',
                   "--set", 'model.quantization_by_device.jetson-xavier-nx="int8"',
                   "--set", "data.client_eval_fraction=0.1", "--set", "federation.evaluate_clients=10",
                   "--set", "federation.evaluate_clients_every=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["sim_time_s"] for r in lines]
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    clients = [c for r in lines[1:] for c in r["clients"] if c["status"] == "ok"]
    for c in clients:
        for key in ("device", "prune_ratio", "sim_seconds", "peak_mem_gb", "reward", "arm"):
            assert key in c
    assert {c["device"] for c in clients} == {"jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier"}
    widths = {"jetson-tx2": "nf4", "jetson-xavier-nx": "int8", "jetson-agx-xavier": None}
    assert all(c.get("quantization") == widths[c["device"]] for c in clients)
    assert len({c["rank"] for c in clients}) > 1 and len({c["arm"]["ratio"] for c in clients}) > 1
    by_client = {}
    for c in clients:
        by_client.setdefault(c["client_id"], []).append((c["rank"], c["arm"]["ratio"]))
    assert any(len(set(v)) > 1 for v in by_client.values())  # choices change over rounds
    tx2 = [c["sim_seconds"] / c["rank"] for c in clients if c["device"] == "jetson-tx2"]
    agx = [c["sim_seconds"] / c["rank"] for c in clients if c["device"] == "jetson-agx-xavier"]
    assert min(tx2) > max(agx)  # the slow class is slower for the same work
    meta = read_checkpoint_meta(out / "checkpoint")
    assert meta["strategy"]["policy"]["learners"] and meta["strategy"]["sim_time_s"] == pytest.approx(times[-1], abs=1e-3)
    # the federated evaluate phase: per-client records of the last round, summed up per device class
    assert all("client_eval" not in r for r in lines[:-1])
    evals = lines[-1]["client_eval"]
    assert evals and all(e["status"] == "ok" for e in evals), evals
    for e in evals:
        assert e["num_examples"] > 0 and 0.0 <= e["eval_accuracy"] <= 1.0 and math.isfinite(e["eval_loss"])
        assert e["masked"] == (str(e["client_id"]) in meta["strategy"]["client_masks"])
    assert any(e["masked"] for e in evals)
    by_device = json.loads((out / "summary.json").read_text())["client_eval"]["by_device"]
    assert set(by_device) == {e["device"] for e in evals} | {"all"}
    for device, row in by_device.items():
        mine = [e for e in evals if device in ("all", e["device"])]
        n = sum(e["num_examples"] for e in mine)
        assert row["clients"] == len(mine) and row["num_examples"] == n
        assert row["eval_accuracy"] == pytest.approx(sum(e["eval_accuracy"] * e["num_examples"] for e in mine) / n)


def test_simulation_attaches_to_a_two_node_ray_cluster(tmp_path):
    """`ray start --head` + `ray start --address` (two nodes of 1 CPU on 127.0.0.1): clients run on both."""
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_TMPDIR": "/tmp/fedtune-ray-cl", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        head = subprocess.run([f"{bindir}/ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
                               "--temp-dir=/tmp/fedtune-ray-cl", *common], env=env, capture_output=True, text=True,
                              timeout=120)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run([f"{bindir}/ray", "start", f"--address=127.0.0.1:{port}", *common], env=env,
                                capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr[-2000:]
        out = tmp_path / "run"
        proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(out),
                       "--set", f'simulation.ray_address="127.0.0.1:{port}"', "--set", "federation.num_rounds=1")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
        assert all(c["status"] == "ok" for c in last["clients"])
        assert len({c["worker"] for c in last["clients"]}) == 2  # both nodes ran clients
    finally:
        stop_ray_under("/tmp/fedtune-ray-cl")


def _peft_eval_loss(out):
    from peft import PeftModel

    from fedtune.core.config import load_config
    from fedtune.data.batching import tokenize
    from fedtune.data.partition import cached_federated_data
    from fedtune.models.loading import load_base_model

    exp = load_config(out / "config.toml")
    base = load_base_model(exp.model, exp.seed)
    model = PeftModel.from_pretrained(base.model, str(out / "adapter")).eval()
    fed = cached_federated_data(exp.data, exp.model.task, exp.federation.num_clients, exp.seed, exp.model.num_labels)
    ev = tokenize(fed.eval, base.tokenizer, "classification", exp.model.max_length)
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([ids])).logits,
                                                          torch.tensor([y]))) for ids, y in zip(ev.input_ids, ev.labels)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("strategy, extra", [("flora", []), ("ffalora", []), ("flexlora", []),
                                             ("fedit", ["--set", "lora.ranks=[4]"])])
def test_every_strategy_runs_and_exports_a_faithful_adapter(strategy, extra, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(out), "--strategy", strategy, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["round"] == 2 and all(c["status"] == "ok" for c in last["clients"])
    # the PEFT adapter (FLoRA: fresh adapter + merged stack as one LoRA) reproduces the server's evaluation
    assert _peft_eval_loss(out) == pytest.approx(last["eval_loss"], rel=1e-4)
    if strategy == "flora":
        rank = json.loads((out / "adapter" / "adapter_config.json").read_text())["r"]
        assert rank == 4 + 2 * (2 + 4 + 2 + 4)  # fresh rank-4 adapter + two rounds of stacked client ranks


def _adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


FAULTS = {"1": "raise", "2": "hang", "3": "nan", "4": "shape", "5": "rank", "6": "missing"}


def test_fault_matrix_bad_updates_never_reach_the_global_adapter(tmp_path):
    """7 clients, 6 of them faulty: the round completes on the good one; each fault is logged
    with the client and the reason; and the global adapter is bit-for-bit the one of a run in
    which the faulty clients sent nothing at all."""
    common = ["--set", "federation.num_clients=7", "--set", "federation.num_rounds=1",
              "--set", "federation.round_timeout_s=40", "--set", "faults.hang_s=50"]
    faulty, clean = tmp_path / "faulty", tmp_path / "clean"
    sets = [x for k, v in FAULTS.items() for x in ("--set", f'faults.clients.{k}="{v}"')]
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(faulty), *common, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    clients = {c["client_id"]: c for c in json.loads((faulty / "metrics.jsonl").read_text().splitlines()[-1])["clients"]}
    assert clients[0]["status"] == "ok"
    expected = {1: ("failed", "client 1: RuntimeError: injected fault in round 1"),
                2: ("failed", "no reply before the round timeout"),
                3: ("rejected", "non-finite values"), 4: ("rejected", "expected ("),
                5: ("rejected", "expected ("), 6: ("rejected", "keys differ from the expected ones")}
    log = proc.stdout + proc.stderr
    for cid, (status, reason) in expected.items():
        assert clients[cid]["status"] == status and reason in clients[cid]["reason"], clients[cid]
        if status == "rejected":  # the server's log names the client and the reason
            assert f"rejected update of client {cid}: {clients[cid]['reason'][:30]}" in log
    assert "round 1: client 1 failed: client 1: RuntimeError: injected fault in round 1" in log
    assert "round 1: client 2 sent no reply within the round timeout (40s); dropped" in log
    raising = [x for k in FAULTS for x in ("--set", f'faults.clients.{k}="raise"')]
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(clean), *common, *raising)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _adapter_tensors(faulty), _adapter_tensors(clean)
    assert a.keys() == b.keys() and all(torch.isfinite(t).all() for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_server_resumes_to_the_same_adapter_bitwise(tmp_path):
    """SIGKILL the server after its round-1 checkpoint; --resume reaches, bit for bit, the adapter
    of an uninterrupted run with the same seed."""
    import signal
    import time

    args = ["--set", "federation.num_rounds=3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(whole), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {**os.environ, "RAY_TMPDIR": "/tmp/fedtune-ray-test", "PYTHONUNBUFFERED": "1"}
    victim = subprocess.Popen([sys.executable, "-m", "fedtune", "simulate", "--config", str(SMOKE), "--out",
                               str(killed), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed / "checkpoint"
    deadline = time.time() + 300
    while time.time() < deadline and not (has_checkpoint(ckpt) and read_checkpoint_meta(ckpt)["round"] >= 1):
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert read_checkpoint_meta(ckpt)["round"] in (1, 2) and not (killed / "summary.json").exists()
    proc = run_cli("simulate", "--config", str(SMOKE), "--out", str(killed), *args, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from checkpoint after round" in proc.stdout
    a, b = _adapter_tensors(whole), _adapter_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rounds = [json.loads(x)["round"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]
