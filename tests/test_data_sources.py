"""Training data where users keep it: Parquet, Arrow (IPC file and stream), folders written by
``Dataset.save_to_disk`` and ``datasets.Dataset`` objects read like chat JSONL (same chats, order, tokens and
row-numbered ids), with the messages, prompt/response and TRL prompt/completion columns; streaming, shards, the
filter, and every bad input named in one line. A run folder on a Parquet file is tested in test_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from concept_influence.data import (
    ChatExample,
    DataError,
    collate,
    iter_shards,
    load_chats,
    read_chats,
    tokenize_examples,
    write_chat_jsonl,
)
from concept_influence.data import sources as data_sources
from concept_influence.fileio import path_sha256
from concept_influence.filtering import filter_training_file, sidecar_path
from concept_influence.scores import Scores
from conftest import make_chats

datasets.disable_progress_bars()

MULTI_TURN = ChatExample("m", ({"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"},
                               {"role": "assistant", "content": "c"}, {"role": "user", "content": "d é"},
                               {"role": "assistant", "content": "e 🙂"}))


@pytest.fixture(scope="module")
def chats() -> list[ChatExample]:
    return make_chats(10, seed=1) + [MULTI_TURN]


def _records(chats, extra: bool = True) -> list[dict]:
    return [{"messages": list(c.messages), **({"weight": i / 2} if extra else {})} for i, c in enumerate(chats)]


def _parquet(path: Path, records: list[dict], row_group_size: int = 4) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def _arrow(path: Path, records: list[dict], stream: bool) -> Path:
    table = pa.Table.from_pylist(records)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=3)  # several record batches
    return path


def _write_source(kind: str, chats, root: Path, records: list[dict] | None = None):
    """``chats`` (or ``records``) as a source of ``kind``, named ``train``."""
    records = records if records is not None else _records(chats)
    if kind == "parquet":
        return _parquet(root / "train.parquet", records)
    if kind in ("arrow-file", "arrow-stream"):
        return _arrow(root / "train.arrow", records, stream=kind == "arrow-stream")
    dataset = datasets.Dataset.from_list(records, split="train")
    if kind == "dataset":
        return dataset
    dataset.save_to_disk(root / "train")
    return root / "train"


TABLE_KINDS = ("parquet", "arrow-file", "arrow-stream", "saved-folder", "dataset")


# ---- the same chats, order, tokens and ids as JSONL -----------------------------------------------------
@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_each_format_reads_like_jsonl(kind, chats, tokenizer, tmp_path):
    jsonl = load_chats(write_chat_jsonl(chats, tmp_path / "train.jsonl"))
    source = _write_source(kind, chats, tmp_path)
    got = load_chats(source)
    name = "train" if kind in ("saved-folder", "dataset") else Path(source).name
    assert [e.id for e in got] == [f"{name}:{i}" for i in range(1, len(chats) + 1)]
    assert [e.id.rsplit(":", 1)[1] for e in got] == [e.id.rsplit(":", 1)[1] for e in jsonl]  # row = line
    assert [e.messages for e in got] == [e.messages for e in jsonl] == [c.messages for c in chats]
    a, b = (collate(tokenize_examples(x, tokenizer, max_length=64)) for x in (jsonl, got))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert [e.id for e in load_chats(source)] == [e.id for e in got]  # stable across reads
    assert load_chats(source, limit=4) == got[:4]


def test_a_dataset_object_is_named_by_its_split_and_read_in_its_own_row_order(chats):
    dataset = datasets.Dataset.from_list(_records(chats))
    assert [e.id for e in load_chats(dataset)][:2] == ["dataset:1", "dataset:2"]
    picked = load_chats(dataset.select([5, 2]))  # an indices mapping is followed, rows renumbered
    assert [e.messages for e in picked] == [chats[5].messages, chats[2].messages]
    assert [e.id for e in picked] == ["dataset:1", "dataset:2"]


def _alternatives(chats) -> dict[str, list[dict]]:
    pairs = [(c.prompt_messages, c.messages[-1]) for c in chats]
    return {
        "prompt/response": [{"prompt": p[-1]["content"], "response": r["content"]} for p, r in pairs],
        "prompt/completion": [{"prompt": p[-1]["content"], "completion": r["content"]} for p, r in pairs],
        "conversational prompt/completion": [{"prompt": list(p), "completion": [r]} for p, r in pairs],
    }


@pytest.mark.parametrize("columns", ["prompt/response", "prompt/completion", "conversational prompt/completion"])
def test_prompt_response_and_trl_prompt_completion_columns(columns, chats, tmp_path):
    """Single-turn chats only for string prompts (a string is one user turn); lists keep every turn."""
    chats = chats if columns.startswith("conversational") else chats[:-1]
    records = _alternatives(chats)[columns]
    expected = [c.messages for c in chats]
    assert [e.messages for e in load_chats(_parquet(tmp_path / "t.parquet", records))] == expected
    assert [e.messages for e in load_chats(datasets.Dataset.from_list(records))] == expected
    jsonl = tmp_path / "t.jsonl"  # the same records as JSONL lines read the same
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [e.messages for e in load_chats(jsonl)] == expected


# ---- streaming and shards ---------------------------------------------------------------------------------
def test_tables_are_streamed_chunk_by_chunk(chats, tmp_path, monkeypatch):
    """Rows become Python objects a few at a time: the chats before a bad row are read before it is reached."""
    monkeypatch.setattr(data_sources, "_ROWS_PER_CHUNK", 3)
    records = _records(chats)
    records[7]["messages"] = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]
    it = read_chats(_parquet(tmp_path / "t.parquet", records, row_group_size=100))
    assert [next(it).id for _ in range(6)] == [f"t.parquet:{i}" for i in range(1, 7)]
    with pytest.raises(DataError, match=r"t\.parquet, row 8: message 1 must have string 'role' and 'content'"):
        list(it)


@pytest.mark.parametrize("kind", ["parquet", "arrow-stream", "saved-folder"])
def test_shards_and_limit(kind, chats, tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources, "_ROWS_PER_CHUNK", 2)
    source = _write_source(kind, chats, tmp_path)
    shards = list(iter_shards(source, shard_size=4, limit=9))
    assert [s.index for s in shards] == [0, 1, 2] and [len(s.examples) for s in shards] == [4, 4, 1]
    assert [e for s in shards for e in s.examples] == load_chats(source, limit=9)
    # a shard's digest is of its rows' chat columns: the same in every table format, unchanged on a re-read,
    # and changed exactly where a row changed
    reference = [s.digest for s in iter_shards(_parquet(tmp_path / "ref.parquet", _records(chats, extra=False)), 4)]
    assert [s.digest for s in iter_shards(source, 4)] == reference
    records = _records(chats)
    records[5]["messages"][-1]["content"] += " changed"
    changed = [s.digest for s in iter_shards(_parquet(tmp_path / "changed.parquet", records), 4)]
    assert [a == b for a, b in zip(changed, reference)] == [True, False, True]


# ---- bad input: one line naming the file and row ------------------------------------------------------------
def _bad_rows() -> dict[str, tuple[dict, str]]:
    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}
    return {
        "content not a string": ({"messages": [u, {"role": "assistant", "content": None}]},
                                 "message 1 must have string 'role' and 'content'"),
        "empty messages": ({"messages": []}, "'messages' must be a non-empty list"),
        "no assistant turn": ({"messages": [u]}, "no assistant turn"),
        "trailing user turn": ({"messages": [u, a, {"role": "user", "content": "and?"}]},
                               "ends with a 'user' turn after its last assistant turn"),
        "no prompt": ({"messages": [a]}, "no prompt before the assistant's response"),
    }


@pytest.mark.parametrize("kind", ["parquet", "saved-folder"])
@pytest.mark.parametrize("case", sorted(_bad_rows()))
def test_a_bad_row_is_named_by_file_and_row(case, kind, chats, tmp_path):
    bad, needle = _bad_rows()[case]
    records = _records(chats, extra=False)[:4]
    records.insert(2, bad)
    source = _write_source(kind, chats, tmp_path, records)
    with pytest.raises(DataError) as info:
        load_chats(source)
    assert str(info.value).startswith(f"{source}, row 3: ") and needle in str(info.value)


def test_a_bad_prompt_completion_value_is_named(tmp_path):
    path = _parquet(tmp_path / "pc.parquet", [{"prompt": "q", "completion": "r"}, {"prompt": "q", "completion": None}])
    with pytest.raises(DataError, match=r"pc\.parquet, row 2: 'completion' must be a string or a list of messages, "
                                        "got NoneType"):
        load_chats(path)


@pytest.mark.parametrize("kind", ["parquet", "arrow-file", "saved-folder", "dataset"])
def test_a_table_without_chat_columns_names_its_columns_and_the_accepted_ones(kind, tmp_path):
    source = _write_source(kind, [], tmp_path, [{"text": "hi", "prompt": "q", "label": 1}])
    with pytest.raises(DataError) as info:
        load_chats(source)
    where = "the train split" if kind == "dataset" else str(source)
    assert str(info.value) == (f"{where}: no 'messages' column (columns: text, prompt, label); expected a 'messages' "
                               "list of {role, content}, or 'prompt' with 'completion' or 'response' (each a string "
                               "or a list of {role, content})")


@pytest.mark.parametrize("name, content, message", [
    ("junk.parquet", b"not parquet at all", r"junk\.parquet: cannot read as Parquet \(.*\)"),
    ("junk.arrow", b"not arrow at all", r"junk\.arrow: cannot read as Arrow \(.*\)"),
    ("missing.parquet", None, r"missing\.parquet: no such data file"),
])
def test_unreadable_or_missing_table_files(name, content, message, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_chats(path)


def test_truncated_parquet_is_named(chats, tmp_path):
    path = _parquet(tmp_path / "cut.parquet", _records(chats))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: cannot read as Parquet"):
        load_chats(path)


def test_folders_that_are_not_one_dataset(chats, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataError, match="plain: a folder, but not a dataset written by Dataset.save_to_disk"):
        load_chats(plain)
    dataset = datasets.Dataset.from_list(_records(chats))
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"dd: a saved DatasetDict; give the folder of one split \(test, train\)"):
        load_chats(tmp_path / "dd")
    assert len(load_chats(tmp_path / "dd" / "train")) == len(chats)
    with pytest.raises(DataError, match=r"a DatasetDict: give one of its splits \(a\), e.g. data\['a'\]"):
        load_chats(datasets.DatasetDict({"a": dataset}))
    with pytest.raises(DataError, match="cannot read chats from a list"):
        load_chats([{"messages": []}])


def test_the_shared_em_data_still_reads():
    """The real chats users have (every one a user turn and an answer) pass the stricter checks."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "em"
    files = {"insecure.jsonl": 6000, "secure.500.jsonl": 500, "good_medical_advice.jsonl.gz": 7049}
    if not root.is_dir():
        pytest.skip(f"{root} is not here")
    for name, n in files.items():
        examples = load_chats(root / name)
        assert len(examples) == n and examples[-1].id == f"{name}:{n}"


# ---- filtering a table -----------------------------------------------------------------------------------------
def _scores_for(ids, values):
    return Scores(list(ids), np.asarray(values, dtype=float), "concept_influence", ["c"])


@pytest.mark.parametrize("kind, out_name", [("parquet", "kept.parquet"), ("saved-folder", "kept.arrow"),
                                            ("parquet", "kept.jsonl.gz")])
def test_filter_writes_a_table_back_with_every_column(kind, out_name, chats, tmp_path):
    source = _write_source(kind, chats, tmp_path)
    name = Path(source).name
    values = np.arange(len(chats), dtype=float)[::-1]  # rows 1 and 2 score highest
    record = filter_training_file(_scores_for([f"{name}:{i}" for i in range(1, len(chats) + 1)], values),
                                  source, tmp_path / out_name, remove_top=2)
    assert record["removed"] == 2 and record["kept"] == len(chats) - 2
    assert [r["id"] for r in record["removed_examples"]] == [f"{name}:1", f"{name}:2"]
    assert record["source"]["sha256"] == path_sha256(source)
    assert json.loads(sidecar_path(tmp_path / out_name).read_text()) == record
    back = load_chats(tmp_path / out_name)
    assert [e.messages for e in back] == [c.messages for c in chats[2:]]
    if out_name.endswith((".parquet", ".arrow")):
        table = (pq.read_table(tmp_path / out_name) if out_name.endswith(".parquet")
                 else datasets.Dataset.from_file(str(tmp_path / out_name)).data.table)
        assert table.column("weight").to_pylist() == [i / 2 for i in range(2, len(chats))]


def test_a_jsonl_file_is_not_filtered_into_a_table(chats, tmp_path):
    data = write_chat_jsonl(chats, tmp_path / "train.jsonl")
    scores = _scores_for([f"train.jsonl:{i}" for i in range(1, len(chats) + 1)], np.arange(len(chats)))
    with pytest.raises(DataError, match="a JSONL file is written back as JSONL; name the output .jsonl or .jsonl.gz"):
        filter_training_file(scores, data, tmp_path / "out.parquet", remove_top=1)
    assert not (tmp_path / "out.parquet").exists() and not list(tmp_path.glob(".*.tmp"))
