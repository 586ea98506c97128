"""Corpora and flwr-datasets partitioning."""

import json

import pytest

from fedtune.core.config import ConfigError, DataConfig
from fedtune.data.corpora import load_corpus
from fedtune.data.partition import FederatedData, make_partitioner


@pytest.mark.parametrize("name, size, n_labels, key", [
    ("rotten-tomatoes", 12808, 2, "movie"),
    ("chatterbot", 2393, 21, "category"),
    ("shakespeare", None, 6, "play"),
])
def test_packaged_corpora(name, size, n_labels, key):
    ds = load_corpus(DataConfig(dataset=name), "classification")
    if size:
        assert len(ds) == size
    assert len(set(ds["label"])) == n_labels and key in ds.column_names
    assert all(isinstance(t, str) and t for t in ds["text"][:50])


def test_shakespeare_has_the_38_plays():
    ds = load_corpus(DataConfig(dataset="shakespeare"), "causal-lm")
    assert len(set(ds["play"])) == 38 and len(ds) > 20000


def test_split_and_partitions_are_deterministic_and_disjoint():
    cfg = DataConfig(partitioner="dirichlet", partitioner_args={"alpha": 0.3}, eval_size=200)
    a = FederatedData(cfg, "classification", 10, seed=4)
    b = FederatedData(cfg, "classification", 10, seed=4)
    assert a.eval["text"] == b.eval["text"]
    parts = [a.partition(i)["text"] for i in range(10)]
    assert parts == [b.partition(i)["text"] for i in range(10)]
    assert sum(len(p) for p in parts) == len(a.train)
    assert not set(a.eval["text"]) & set(parts[0])
    # label skew: partitions differ in their label mix
    fractions = [sum(a.partition(i)["label"]) / len(parts[i]) for i in range(10)]
    assert max(fractions) - min(fractions) > 0.3


def test_stratified_held_out_set_keeps_the_label_shares():
    from collections import Counter

    corpus = load_corpus(DataConfig(dataset="chatterbot"), "classification")
    share = Counter(corpus["label"])
    cfg = DataConfig(dataset="chatterbot", eval_size=300, eval_stratify="label")
    fed = FederatedData(cfg, "classification", 4, seed=3)
    held = Counter(fed.eval["label"])
    assert len(fed.eval) == 300 and len(fed.train) == len(corpus) - 300
    for label, n in share.items():  # each label within one example of its exact share
        assert abs(held[label] - 300 * n / len(corpus)) < 1.0, (label, held[label])
    assert not set(fed.eval["text"]) & set(fed.train["text"]) - set(t for t, c in Counter(corpus["text"]).items() if c > 1)
    again = FederatedData(cfg, "classification", 4, seed=3)
    assert again.eval["text"] == fed.eval["text"]
    plain = FederatedData(DataConfig(dataset="chatterbot", eval_size=300), "classification", 4, seed=3)
    assert plain.eval["text"] != fed.eval["text"]
    with pytest.raises(ConfigError, match="data.eval_stratify: the corpus has no column 'genre'"):
        FederatedData(DataConfig(dataset="chatterbot", eval_size=300, eval_stratify="genre"), "classification", 4,
                      seed=3)


def test_natural_id_partitioning_by_play():
    fed = FederatedData(DataConfig(dataset="shakespeare", partitioner="natural-id", partition_by="play"),
                        "causal-lm", 38, seed=0)
    assert len(set(fed.partition(5)["play"])) == 1


def test_user_jsonl_and_csv_files(tmp_path):
    rows = [{"sentence": f"text {i}", "y": "pos" if i % 2 else "neg"} for i in range(30)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_corpus(DataConfig(dataset=str(jl), text_key="sentence", label_key="y"), "classification")
    assert ds["label"][:2] == [0, 1] and ds["text"][1] == "text 1"
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,y\n" + "\n".join(f"{r['sentence']},{i % 3}" for i, r in enumerate(rows)))
    ds = load_corpus(DataConfig(dataset=str(csv_path), text_key="sentence", label_key="y"), "classification")
    assert sorted(set(ds["label"])) == [0, 1, 2]


def test_bad_data_inputs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset: file not found"):
        load_corpus(DataConfig(dataset=str(tmp_path / "missing.jsonl")), "classification")
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x", "label": 1}\n')
    with pytest.raises(ConfigError, match="data.text_key: column 'text'"):
        load_corpus(DataConfig(dataset=str(f)), "classification")
    with pytest.raises(ConfigError, match="data.dataset: unknown corpus 'imdb'"):
        load_corpus(DataConfig(dataset="imdb"), "classification")
    with pytest.raises(ConfigError, match="data.partitioner: unknown partitioner"):
        make_partitioner(DataConfig(partitioner="nope"), 4, 0)
    with pytest.raises(ConfigError, match="data.partitioner_args.beta"):
        make_partitioner(DataConfig(partitioner="dirichlet", partitioner_args={"beta": 1}), 4, 0)
