"""Where chats are read from and written to: chat JSONL (optionally gzipped), Parquet, Arrow, folders written by
``Dataset.save_to_disk`` and ``datasets.Dataset`` objects, streamed a chunk of rows at a time; shards of a source
with the digest of their records; writing the kept records of a source back in its format."""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, Union

from .chats import ACCEPTED_COLUMNS, ChatExample, DataError, chat_keys, parse_messages

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["DataSource", "read_chats", "read_chat_jsonl", "Shard", "iter_shards", "load_chats", "load_chat_jsonl",
           "write_chat_jsonl", "write_kept"]

#: Where chats come from: a file or folder path (see :func:`read_chats`) or a ``datasets.Dataset``.
DataSource = Union[str, Path, "Dataset"]

def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


_ROWS_PER_CHUNK = 1024  # table rows turned into Python objects at a time

def _is_table(source: DataSource) -> bool:
    """Whether ``source`` is read with pyarrow (Parquet, Arrow, a saved dataset) rather than as JSONL."""
    if not isinstance(source, (str, Path)):
        return True
    path = Path(source)
    return path.is_dir() or path.suffix in (".parquet", ".arrow")


def _read_examples(source: DataSource) -> Iterator[tuple[ChatExample, str]]:
    """Stream ``(example, raw record)`` pairs of any data source; see :func:`read_chats` for the errors.

    The one place a data source is opened: a JSONL record is its line, a table row its chat columns as JSON."""
    if _is_table(source):
        for _, pairs in _read_table(source):
            yield from pairs
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield ChatExample(f"{path.name}:{lineno}", parse_messages(obj, where)), line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _open_table(source: DataSource):
    """``(id prefix, name in errors, schema, record batches)`` of a table source."""
    import pyarrow as pa

    if not isinstance(source, (str, Path)):
        return _open_dataset(source)
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path}: a saved DatasetDict; give the folder of one split ({', '.join(splits)})")
        if not (path / "state.json").is_file():
            raise DataError(f"{path}: a folder, but not a dataset written by Dataset.save_to_disk (no state.json)")
        from datasets import load_from_disk

        return _open_dataset(load_from_disk(str(path)), path.name, str(path))
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        return path.name, str(path), parquet.schema_arrow, parquet.iter_batches(batch_size=_ROWS_PER_CHUNK)
    mapped = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(mapped)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # not the IPC file format: the stream format (what `datasets` writes)
        mapped.seek(0)
        reader = batches = pa.ipc.open_stream(mapped)
    return path.name, str(path), reader.schema, batches


def _open_dataset(dataset, name: str | None = None, where: str | None = None):
    """A ``datasets.Dataset`` as a table source; an object passed in is named by its split (else ``dataset``)."""
    from datasets import Dataset, DatasetDict

    if isinstance(dataset, DatasetDict):
        raise DataError(f"a DatasetDict: give one of its splits ({', '.join(dataset)}), e.g. data[{next(iter(dataset))!r}]")
    if not isinstance(dataset, Dataset):
        raise DataError(f"cannot read chats from a {type(dataset).__name__}: give a data file, a folder written by "
                        "Dataset.save_to_disk, or a datasets.Dataset")
    split = str(dataset.split) if dataset.split else None
    name, where = name or split or "dataset", where or (f"the {split} split" if split else "the dataset")
    return name, where, dataset.features.arrow_schema, dataset.with_format("arrow").iter(_ROWS_PER_CHUNK)


def _chat_columns(names: Sequence[str], where: str) -> list[str]:
    """The columns a table's chats are read from (:func:`chat_keys`)."""
    keys = chat_keys(names)
    if keys is None:
        raise DataError(f"{where}: no 'messages' column (columns: {', '.join(names) or 'none'}); "
                        f"expected {ACCEPTED_COLUMNS}")
    return keys


def _read_table(source: DataSource) -> Iterator[tuple[object, list[tuple[ChatExample, str]]]]:
    """Stream a table source as ``(chunk of rows with every column, its (example, raw record) pairs)``; row ``r``
    (1-based) has the id ``"<name>:<r>"``. Only one chunk of rows is turned into Python objects at a time."""
    import pyarrow as pa

    is_path = isinstance(source, (str, Path))
    where = str(source) if is_path else "the dataset"
    kind = {".parquet": "Parquet", ".arrow": "Arrow"}.get(Path(source).suffix if is_path else "", "a dataset")
    try:
        name, where, schema, batches = _open_table(source)
        columns = _chat_columns(schema.names, where)
        row = 0
        for batch in batches:
            for start in range(0, batch.num_rows, _ROWS_PER_CHUNK):
                chunk = batch.slice(start, _ROWS_PER_CHUNK)
                pairs = []
                for record in chunk.select(columns).to_pylist():
                    row += 1
                    example = ChatExample(f"{name}:{row}", parse_messages(record, f"{where}, row {row}"))
                    pairs.append((example, json.dumps(record, ensure_ascii=False, default=str)))
                yield chunk, pairs
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{where}: cannot read as {kind} ({e})") from None


def read_chats(source: DataSource) -> Iterator[ChatExample]:
    """Stream the chats of ``source``: a chat JSONL file (``.jsonl``, or gzipped ``.jsonl.gz``; blank lines are
    skipped), a Parquet file (``.parquet``), an Arrow IPC file or stream (``.arrow``), a folder written by
    ``Dataset.save_to_disk``, or a ``datasets.Dataset``. A record holds :data:`ACCEPTED_COLUMNS`.

    Ids are ``"<file name>:<line>"`` for JSONL and ``"<file or folder name>:<row>"`` for tables (1-based; a
    ``Dataset`` object is named by its split, else ``dataset``). Raises :class:`DataError` naming the file and
    line or row for a missing or unreadable source, bad JSON, a record without a chat, malformed messages, or a
    chat that does not end with an assistant turn after a prompt.
    """
    for example, _ in _read_examples(source):
        yield example


#: The former name of :func:`read_chats` (every source is read, not only JSONL).
read_chat_jsonl = read_chats


@dataclass(frozen=True)
class Shard:
    """``size`` consecutive examples of a source; ``digest`` is the SHA-256 of their raw records (JSONL lines,
    table rows' chat columns as JSON), so a saved result for the shard can be reused exactly when its input is
    unchanged."""

    index: int
    examples: list[ChatExample]
    digest: str


def iter_shards(source: DataSource, shard_size: int, limit: int | None = None,
                then: Sequence[tuple[DataSource, int | None]] = ()) -> Iterator[Shard]:
    """Stream a data source (any that :func:`read_chats` reads) as shards of ``shard_size`` examples (the last may
    be shorter), reading at most ``limit`` examples, followed in the same stream of shards by at most ``n`` examples
    of each ``(source, n)`` of ``then``. Only one shard is held in memory at a time."""
    import hashlib
    import itertools

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    records = itertools.chain.from_iterable(itertools.islice(_read_examples(s), n) for s, n in [(source, limit), *then])
    examples, digest, index = [], hashlib.sha256(), 0
    for example, line in records:
        examples.append(example)
        digest.update(line.rstrip("\n").encode())
        digest.update(b"\n")
        if len(examples) == shard_size:
            yield Shard(index, examples, digest.hexdigest())
            examples, digest, index = [], hashlib.sha256(), index + 1
    if examples:
        yield Shard(index, examples, digest.hexdigest())


def load_chats(source: DataSource, limit: int | None = None) -> list[ChatExample]:
    """Read up to ``limit`` chats of ``source`` (any that :func:`read_chats` reads) into a list."""
    out = []
    for ex in read_chats(source):
        if limit is not None and len(out) >= limit:
            break
        out.append(ex)
    return out


#: The former name of :func:`load_chats`.
load_chat_jsonl = load_chats


def write_chat_jsonl(examples: Iterable[ChatExample], path: str | Path) -> Path:
    """Write examples as chat JSONL (gzip when the name ends in ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"messages": list(ex.messages)}, ensure_ascii=False) + "\n")
    return path


def write_kept(source: DataSource, path: str | Path, keep: Callable[[str], bool], name: str | None = None
               ) -> tuple[list[str], int]:
    """Write the records of ``source`` whose example id ``keep`` accepts to ``path``, in the format that ``name``
    (default: ``path``'s own name) ends with: ``.parquet`` or ``.arrow`` (an Arrow IPC stream, as ``datasets``
    writes) keep every column of a table source; any other name is JSONL (gzipped for ``.gz``), each record as
    read (a JSONL line unchanged; a table row's chat columns). Returns every id read and the number written."""
    path = Path(path)
    fmt = Path(name or path.name).suffix
    seen, kept = [], 0
    if fmt in (".parquet", ".arrow"):
        if not _is_table(source):
            raise DataError(f"{source}: a JSONL file is written back as JSONL; name the output .jsonl or .jsonl.gz")
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        try:
            for chunk, pairs in _read_table(source):
                mask = [keep(example.id) for example, _ in pairs]
                seen += [example.id for example, _ in pairs]
                kept += sum(mask)
                if writer is None:
                    writer = (pq.ParquetWriter(path, chunk.schema) if fmt == ".parquet"
                              else pa.ipc.new_stream(str(path), chunk.schema))
                writer.write(chunk.filter(pa.array(mask, pa.bool_())))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise DataError(f"{source}: no rows to write")
        return seen, kept
    opener = gzip.open if fmt == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for example, record in _read_examples(source):
            seen.append(example.id)
            if keep(example.id):
                fh.write(record if record.endswith("\n") else record + "\n")
                kept += 1
    return seen, kept

