"""Run outputs: ``metrics.jsonl`` (one JSON object per round), ``summary.json`` and plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedtune.core.metric import masked, metric_of_records
from fedtune.core.protocol import ClientKey as C
from fedtune.core.protocol import RoundKey as R
from fedtune.core.protocol import Status
from strategies.base import ALL_DEVICES, CLIENT_EVAL, client_eval_summary

__all__ = ["MetricsWriter", "read_metrics", "summarize", "plot_metrics", "format_progress"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends one JSON line per round, flushed and fsync'd; on resume, keeps only rounds up to the
    checkpoint.

    Opening rewrites the file atomically (a temporary file, fsync, ``os.replace``): empty for a new
    run, the kept rounds for a resumed one. A partial last line of an interrupted session is dropped
    then, so appends always start on a fresh line.
    """

    def __init__(self, path: Path, keep_up_to_round: int | None = None) -> None:
        self.path = path
        if keep_up_to_round is None:
            kept: list[dict[str, Any]] = []
        else:
            kept = [r for r in read_metrics(path) if r[R.ROUND] <= keep_up_to_round] if path.exists() else []
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one JSON object per line; blank lines are skipped.

    A record counts once its line is terminated: the last line, when it has no newline or does not
    parse as a JSON object, is a partial write (a writer interrupted mid-line, or one still writing)
    and is left out. Any other line that does not parse as a JSON object is an error: a
    ``ValueError`` naming the file and the line number.
    """
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines[-1] = ""  # unterminated: partial
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for i, (n, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            problem = "" if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        except json.JSONDecodeError as exc:
            problem = f"not JSON ({exc.msg})"
        if problem:
            if i == len(numbered) - 1:
                break
            raise ValueError(f"{path}, line {n}: {problem}")
        records.append(record)
    return records


def summarize(records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    first, last = records[0], records[-1]
    metric = metric_of_records([first]).key
    evals = [r for r in records if r.get(metric) is not None]
    out = {
        "rounds": last[R.ROUND],
        "metric": metric,
        f"initial_{metric}": first.get(metric),
        f"final_{metric}": evals[-1].get(metric) if evals else None,
        "initial_eval_loss": first.get(R.EVAL_LOSS),
        "final_eval_loss": evals[-1].get(R.EVAL_LOSS) if evals else None,
        "wall_time_s": last[R.WALL_TIME_S],
        "bytes_up": sum(r.get(R.BYTES_UP, 0) for r in records),
        "bytes_down": sum(r.get(R.BYTES_DOWN, 0) for r in records),
        "client_rounds_ok": sum(sum(c[C.STATUS] == Status.OK for c in r.get(R.CLIENTS, [])) for r in records),
        "client_rounds_failed": sum(sum(c[C.STATUS] != Status.OK for c in r.get(R.CLIENTS, [])) for r in records),
    }
    masked_key = masked(metric_of_records([first])).key
    masked_evals = [r for r in records if r.get(masked_key) is not None]
    if masked_evals:
        out[f"final_{masked_key}"] = masked_evals[-1][masked_key]
    if metric == "eval_accuracy" and evals:
        out["best_eval_accuracy"] = max(r[metric] for r in evals)
        out["accuracy_gain"] = out[f"final_{metric}"] - out[f"initial_{metric}"]
    out.update(extra)
    return _clean(out)


def plot_metrics(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Eval metric and mean client train loss per round, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib comes with flwr-datasets
        return None
    metric = metric_of_records(records[:1]).key
    ev = [(r[R.ROUND], r[metric]) for r in records if r.get(metric) is not None]
    tl = [(r[R.ROUND], r[R.TRAIN_LOSS]) for r in records if r.get(R.TRAIN_LOSS) is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if ev:
        axes[0].plot(*zip(*ev), marker="o")
    axes[0].set(xlabel="round", ylabel=metric.replace("_", " "), title="server held-out evaluation")
    if tl:
        axes[1].plot(*zip(*tl), marker="o", color="tab:orange")
    axes[1].set(xlabel="round", ylabel="train loss", title="mean client train loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_progress(record: dict[str, Any], num_rounds: int) -> str:
    clients = record.get(R.CLIENTS, [])
    ok = sum(c[C.STATUS] == Status.OK for c in clients)
    parts = [f"round {record['round']:>3}/{num_rounds}"]
    if record[R.ROUND] > 0:
        parts.append(f"clients {ok}/{len(clients)} ok")
        if record.get(R.TRAIN_LOSS) is not None:
            parts.append(f"train_loss {record[R.TRAIN_LOSS]:.4f}")
    if record.get(R.EVAL_LOSS) is not None:
        parts.append(f"eval_loss {record[R.EVAL_LOSS]:.4f}")
    if record.get("eval_accuracy") is not None:
        parts.append(f"accuracy {record['eval_accuracy']:.4f}")
    if record.get("eval_perplexity") is not None:
        parts.append(f"perplexity {record['eval_perplexity']:.2f}")
    if record.get(CLIENT_EVAL):
        fed = client_eval_summary(record[CLIENT_EVAL])[ALL_DEVICES]
        name = "accuracy" if "eval_accuracy" in fed else "perplexity"
        value = fed.get(f"eval_{name}")
        parts.append(f"client eval {fed['clients']}/{fed['clients'] + fed['failed']} ok"
                     + (f", {name} {value:.4f}" if value is not None else ""))
    parts.append(f"elapsed {record['wall_time_s']:.1f}s")
    return " | ".join(parts)


PROVENANCE_PACKAGES = ("flwr", "torch", "transformers", "peft", "ray", "bitsandbytes", "flwr-datasets", "numpy")


def provenance() -> dict[str, Any]:
    """What produced a run: fedtune's version, the git commit of its source tree (when it is a
    checkout; ``dirty`` when it has uncommitted changes), key package versions and the machine."""
    import platform
    import subprocess
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    out: dict[str, Any] = {"fedtune": version("fedtune"), "python": platform.python_version(),
                           "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
                           "packages": {d: v for d in PROVENANCE_PACKAGES if (v := version(d))}}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            out["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out
