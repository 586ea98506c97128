"""Checkpoints commit in one step, metrics.jsonl readers survive a torn last line, and a run
directory is neither resumed under another experiment nor overwritten without being asked."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fedtune.core.config import ConfigError, config_to_toml, load_config
from fedtune.lora.factors import GlobalAdapter
from fedtune.round import checkpoint as ckpt_mod
from fedtune.round.checkpoint import (
    POINTER,
    check_run_dir,
    config_hash,
    has_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from fedtune.round.outputs import MetricsWriter, read_metrics


def state_of(value: float) -> GlobalAdapter:
    return GlobalAdapter(adapter={"enc.q": (torch.full((2, 3), value), torch.full((4, 2), value))},
                         head={"classifier.weight": torch.full((2, 4), value)})


def value_of(state: GlobalAdapter) -> float:
    a, b = state.adapter["enc.q"]
    values = {a.flatten()[0].item(), b.flatten()[0].item(), state.head["classifier.weight"].flatten()[0].item()}
    assert len(values) == 1
    return values.pop()


def save_round(path, rnd):
    save_checkpoint(state_of(float(rnd)), rnd, path, {"wall_time_s": 10.0 * rnd, "strategy": {"round": rnd}})


# ---- checkpoint layout ----------------------------------------------------------------------------


def test_a_checkpoint_is_a_round_directory_named_by_the_pointer(tmp_path):
    path = tmp_path / "checkpoint"
    assert not has_checkpoint(path)
    save_round(path, 1)
    assert (path / POINTER).read_text() == "round-0001\n"
    assert sorted(p.name for p in (path / "round-0001").iterdir()) == ["meta.json", "state.safetensors"]
    assert has_checkpoint(path)
    state, meta = load_checkpoint(path)
    assert value_of(state) == 1.0 and meta == {"round": 1, "wall_time_s": 10.0, "strategy": {"round": 1}}
    assert read_checkpoint_meta(path) == meta


def test_files_and_directories_are_fsynced_before_the_pointer_moves(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    save_round(path, 1)
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def record(kind, real):
        def move(src, dst):
            events.append((kind, os.path.basename(src), os.path.basename(dst)))
            real(src, dst)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", record("replace", real_replace))
    monkeypatch.setattr(os, "rename", record("rename", real_rename))
    save_round(path, 2)
    tmp = path / ".round-0002.tmp"
    assert events == [
        ("fsync", str(tmp / "state.safetensors")), ("fsync", str(tmp / "meta.json")), ("fsync", str(tmp)),
        ("rename", ".round-0002.tmp", "round-0002"), ("fsync", str(path)),
        ("fsync", str(path / f"{POINTER}.tmp")), ("replace", f"{POINTER}.tmp", POINTER), ("fsync", str(path)),
    ]


def test_only_the_last_two_rounds_are_kept(tmp_path):
    path = tmp_path / "checkpoint"
    for rnd in range(1, 6):
        save_round(path, rnd)
    assert sorted(p.name for p in path.iterdir()) == [POINTER, "round-0004", "round-0005"]
    assert read_checkpoint_meta(path)["round"] == 5


def test_a_crash_before_the_pointer_moves_leaves_the_previous_round_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    save_round(path, 1)
    save_round(path, 2)
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if os.path.basename(dst) == POINTER:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_pointer)
    with pytest.raises(OSError, match="killed"):
        save_round(path, 3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (path / "round-0003" / "state.safetensors").is_file()  # round 3 is on disk, uncommitted
    state, meta = load_checkpoint(path)
    assert meta["round"] == 2 and value_of(state) == 2.0 and meta["strategy"] == {"round": 2}
    # the resumed run writes round 3 again and commits it; the torn leftovers go
    save_checkpoint(state_of(3.5), 3, path, {"strategy": {"round": 3}})
    state, meta = load_checkpoint(path)
    assert meta["round"] == 3 and value_of(state) == 3.5
    assert sorted(p.name for p in path.iterdir()) == [POINTER, "round-0002", "round-0003"]


def test_a_crash_while_writing_a_round_leaves_the_previous_round_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    save_round(path, 1)
    real_write = ckpt_mod._write_durably

    def crash_on_meta(target, data):
        if target.name == "meta.json":
            target.write_bytes(data[: len(data) // 2])
            raise OSError("killed")
        real_write(target, data)

    monkeypatch.setattr(ckpt_mod, "_write_durably", crash_on_meta)
    with pytest.raises(OSError, match="killed"):
        save_round(path, 2)
    state, meta = load_checkpoint(path)
    assert meta["round"] == 1 and value_of(state) == 1.0


def test_a_committed_round_is_not_rewritten(tmp_path):
    path = tmp_path / "checkpoint"
    save_round(path, 1)
    with pytest.raises(ValueError, match="already committed"):
        save_round(path, 1)


def test_an_old_layout_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "run" / "checkpoint"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"round": 1}))
    (path / "state.safetensors").write_bytes(b"")
    assert not has_checkpoint(path)
    with pytest.raises(ConfigError, match="old single-directory layout"):
        load_checkpoint(path)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'run'} holds a checkpoint of the old"):
        check_run_dir(tmp_path / "run", load_config(), resume=True, force=False)


def test_a_pointer_to_a_missing_round_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "checkpoint"
    save_round(path, 1)
    (path / POINTER).write_text("round-0009\n")
    assert not has_checkpoint(path)
    with pytest.raises(ConfigError, match="round-0009, which is incomplete"):
        read_checkpoint_meta(path)


# ---- metrics.jsonl ---------------------------------------------------------------------------------


def lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize("tail", ['{"round": 2, "wall_ti', '{"round": 2}', '{"round": 2, "wall_ti\n', "\x00\x00\x00"])
def test_a_partial_last_line_is_left_out(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}, {"round": 1}) + tail)
    assert [r["round"] for r in read_metrics(path)] == [0, 1]


def test_a_bad_line_in_the_middle_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}) + '{"round": 1,\n' + lines({"round": 2}))
    with pytest.raises(ValueError, match=rf"{path}, line 2: not JSON"):
        read_metrics(path)
    path.write_text(lines({"round": 0}, [1], {"round": 2}))
    with pytest.raises(ValueError, match=rf"{path}, line 2: a JSON list, not an object"):
        read_metrics(path)


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}) + "\n\n" + lines({"round": 1}))
    assert [r["round"] for r in read_metrics(path)] == [0, 1]


def test_the_writer_drops_a_partial_line_on_resume_and_fsyncs_each_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}, {"round": 1}, {"round": 2}) + '{"round": 3, "tr')
    writer = MetricsWriter(path, keep_up_to_round=1)
    assert path.read_text() == lines({"round": 0}, {"round": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    writer.write({"round": 2, "loss": float("nan")})
    assert len(synced) == 1
    assert read_metrics(path) == [{"round": 0}, {"round": 1}, {"round": 2, "loss": None}]
    MetricsWriter(path)  # a new run starts empty
    assert path.read_text() == ""


# ---- the run directory -----------------------------------------------------------------------------


@pytest.fixture
def cfg():
    return load_config(None, ["federation.num_rounds=2"])


def committed_run(out, cfg):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text(lines({"round": 0}))
    save_checkpoint(state_of(1.0), 1, out / "checkpoint", {"config_hash": config_hash(cfg)})


def test_the_config_hash_ignores_run_length_and_survives_the_toml_round_trip(tmp_path, cfg):
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    assert config_hash(load_config(tmp_path / "c.toml")) == config_hash(cfg)
    assert config_hash(load_config(None, ["federation.num_rounds=7", "faults.rounds=[1]"])) == config_hash(cfg)
    assert config_hash(load_config(None, ["federation.num_rounds=2", "seed=1"])) != config_hash(cfg)


CASES = {
    "resume-without-checkpoint": (True, False, "empty", r"--resume: no checkpoint in {out}$"),
    "resume-other-config": (True, False, "other", r"--resume: the checkpoint in {out} was written under a different"
                                                   r" experiment config than this one; pass --force to resume anyway$"),
    "resume-other-config-forced": (True, True, "other", None),
    "resume-same-config": (True, False, "same", None),
    "overwrite": (False, False, "same", r"--out {out}: not empty \(a run is there\); pass --resume to continue it"
                                        r" or --force to overwrite$"),
    "overwrite-forced": (False, True, "same", None),
    "new-run-in-missing-dir": (False, False, "missing", None),
    "new-run-in-empty-dir": (False, False, "empty", None),
}


@pytest.mark.parametrize("resume, force, contents, error", list(CASES.values()), ids=list(CASES))
def test_check_run_dir(tmp_path, cfg, resume, force, contents, error):
    out = tmp_path / "my-run"
    if contents == "empty":
        out.mkdir()
    elif contents in ("same", "other"):
        committed_run(out, cfg if contents == "same" else load_config(None, ["seed=5"]))
    if error is None:
        check_run_dir(out, cfg, resume=resume, force=force)
    else:
        with pytest.raises(ConfigError, match=error.format(out=out)) as info:
            check_run_dir(out, cfg, resume=resume, force=force)
        assert "\n" not in str(info.value)


class FakeStrategy:
    def __init__(self):
        self.state, self.loaded = None, None

    def initial_state(self, shapes, head):
        return state_of(0.0)

    def set_state(self, state):
        self.state = state

    def load_state_dict(self, d):
        self.loaded = d


def fake_run(out, cfg):
    return SimpleNamespace(cfg=cfg, out_dir=out, ckpt_dir=out / "checkpoint", strategy=FakeStrategy(), base=None,
                           elapsed_before=0.0)


@pytest.fixture
def no_model(monkeypatch):
    from fedtune.round import loop

    monkeypatch.setattr(loop, "lora_shapes", lambda base, cfg: {})
    monkeypatch.setattr(loop, "head_state", lambda base: {})
    return loop


def test_restore_resumes_the_committed_round(tmp_path, cfg, no_model):
    out = tmp_path / "run"
    committed_run(out, cfg)
    (out / "summary.json").write_text("{}")
    run = fake_run(out, cfg)
    state, start = no_model.restore(run, resume=True)
    assert start == 1 and value_of(state) == 1.0 and run.strategy.state is state
    assert not (out / "summary.json").exists()  # not finished until finish() writes it again


def test_restore_refuses_another_experiments_checkpoint_unless_forced(tmp_path, cfg, no_model):
    out = tmp_path / "run"
    committed_run(out, cfg)
    other = load_config(None, ["seed=5"])
    with pytest.raises(ConfigError, match=f"resume: the checkpoint in {out} was written under a different"):
        no_model.restore(fake_run(out, other), resume=True)
    with pytest.raises(ConfigError, match="pass force to resume anyway"):
        no_model.resume_meta(other, out, resume=True)
    state, start = no_model.restore(fake_run(out, other), resume=True, force=True)
    assert start == 1 and value_of(state) == 1.0


def test_a_new_run_in_a_used_directory_starts_without_the_old_checkpoint(tmp_path, cfg, no_model):
    out = tmp_path / "run"
    committed_run(out, cfg)
    (out / "summary.json").write_text("{}")
    check_run_dir(out, cfg, resume=False, force=True)
    state, start = no_model.restore(fake_run(out, cfg), resume=False)
    assert start == 0 and value_of(state) == 0.0
    assert not (out / "checkpoint").exists() and not (out / "summary.json").exists()
    MetricsWriter(out / "metrics.jsonl")  # what train() opens for round 0
    assert read_metrics(out / "metrics.jsonl") == []
