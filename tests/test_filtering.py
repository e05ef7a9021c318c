"""`filter`: removing the top of a ranking from a training file, its sidecar, and bad input."""

import gzip
import json

import numpy as np
import pytest

from concept_influence.data import ChatExample, write_chat_jsonl
from concept_influence.filtering import FilterError, filter_training_file, removal_indices, sidecar_path
from concept_influence.scores import Scores


def test_removal_indices_fraction_count_and_keep_bottom():
    values = np.array([0.5, 3.0, -1.0, 3.0, 2.0])
    assert removal_indices(values, remove_top=0.4).tolist() == [1, 3]  # ties keep data order
    assert removal_indices(values, remove_top=3).tolist() == [1, 3, 4]
    assert removal_indices(values, remove_top=0).tolist() == []
    assert removal_indices(values, keep_bottom=2).tolist() == [1, 3, 4]
    assert removal_indices(values, keep_bottom=0.4).tolist() == [1, 3, 4]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of remove_top"),
    ({"remove_top": 0.1, "keep_bottom": 0.5}, "exactly one of remove_top"),
    ({"remove_top": -1}, "remove_top must be"),
    ({"remove_top": 2.5}, "whole count"),
    ({"remove_top": 9}, "more than the 5 scored"),
    ({"keep_bottom": float("nan")}, "keep_bottom must be"),
])
def test_removal_indices_bad_options(kwargs, message):
    with pytest.raises(FilterError, match=message):
        removal_indices(np.arange(5.0), **kwargs)


def _write_data(tmp_path, n=6, name="train.jsonl"):
    chats = [ChatExample.from_pair("x", f"prompt {i}", f"answer {i} ünïcode") for i in range(n)]
    return write_chat_jsonl(chats, tmp_path / name)


def _scores(ids, values, name="s.safetensors", tmp_path=None):
    s = Scores(list(ids), np.asarray(values, dtype=float), "concept_influence", ["planted_probe"])
    return s.save(tmp_path / name) if tmp_path is not None else s


def test_filter_writes_kept_lines_verbatim_and_a_sidecar(tmp_path):
    data = _write_data(tmp_path)
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    ids = [f"train.jsonl:{i}" for i in range(1, 7)]
    scores_path = _scores(ids, [0.1, 5.0, 0.2, 4.0, -3.0, 0.0], tmp_path=tmp_path)
    out = tmp_path / "filtered" / "train.jsonl.gz"
    record = filter_training_file(scores_path, data, out, remove_top=2)
    with gzip.open(out, "rt", encoding="utf-8") as fh:
        kept = fh.readlines()
    assert kept == [lines[i] for i in (0, 2, 4, 5)]
    side = json.loads(sidecar_path(out).read_text())
    assert side == record
    assert [r["id"] for r in side["removed_examples"]] == ["train.jsonl:2", "train.jsonl:4"]
    assert [r["rank"] for r in side["removed_examples"]] == [1, 2]
    assert side["removed"] == 2 and side["kept"] == 4 and side["examples"] == 6 and side["unscored_kept"] == 0
    assert side["rule"] == {"remove_top": 2} and side["scores"]["estimator"] == "concept_influence"
    assert len(side["source"]["sha256"]) == 64 and len(side["scores"]["sha256"]) == 64


def test_unscored_examples_are_kept_and_counted(tmp_path):
    data = _write_data(tmp_path)
    scores = _scores(["train.jsonl:1", "train.jsonl:3", "train.jsonl:5"], [1.0, 2.0, 3.0])
    record = filter_training_file(scores, data, tmp_path / "out.jsonl", keep_bottom=1)
    assert record["removed"] == 2 and record["kept"] == 4 and record["unscored_kept"] == 3
    kept = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == ["prompt 0", "prompt 1", "prompt 3", "prompt 5"]


def test_scores_of_another_file_are_refused_and_nothing_is_written(tmp_path):
    data = _write_data(tmp_path)
    scores = _scores(["other.jsonl:1", "other.jsonl:2"], [1.0, 2.0])
    out = tmp_path / "out.jsonl"
    with pytest.raises(FilterError, match=r"do not match .*train.jsonl: 2 of 2 scored ids .*'other.jsonl:1'"):
        filter_training_file(scores, data, out, remove_top=1)
    assert not out.exists() and not sidecar_path(out).exists()


def test_existing_output_and_the_input_itself_are_never_overwritten(tmp_path):
    data = _write_data(tmp_path)
    scores = _scores([f"train.jsonl:{i}" for i in range(1, 7)], np.arange(6.0))
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(FilterError, match="exists"):
        filter_training_file(scores, data, out, remove_top=1)
    assert out.read_text() == "precious\n"
    with pytest.raises(FilterError, match="replace the training file"):
        filter_training_file(scores, data, data, remove_top=1, overwrite=True)
    filter_training_file(scores, data, out, remove_top=1, overwrite=True)
    assert len(out.read_text().splitlines()) == 5


def test_unreadable_scores_and_unknown_column(tmp_path):
    data = _write_data(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(FilterError, match="bad.safetensors: cannot read scores"):
        filter_training_file(bad, data, tmp_path / "o.jsonl", remove_top=1)
    scores = _scores([f"train.jsonl:{i}" for i in range(1, 7)], np.arange(6.0))
    with pytest.raises(FilterError, match="no column 'nope'; columns: planted_probe"):
        filter_training_file(scores, data, tmp_path / "o.jsonl", remove_top=1, column="nope")
