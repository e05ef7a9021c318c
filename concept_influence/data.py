"""Chat data in the Hugging Face messages format -> token batches with response masks.

An example is one record ``{"messages": [{"role": ..., "content": ...}, ...]}`` (or ``prompt`` with
``completion``/``response``): a line of a chat JSONL file (optionally gzipped), or a row of a Parquet file, an
Arrow file, a folder written by ``Dataset.save_to_disk`` or a ``datasets.Dataset`` (tables are streamed in record
batches, never loaded whole). The *response* is the final turn, the assistant's; the *prompt* is everything before
it. Example ids are ``"<file name>:<line>"`` or ``"<name>:<row>"`` (1-based), stable across runs and batch sizes.

Tokenisation uses the tokenizer's chat template when it has one. Otherwise the plain template is::

    <bos>User: {content}\\nSystem: {content}\\n...Assistant: {response}<eos>

i.e. each prompt turn as ``"{Role}: {content}\\n"`` followed by ``"Assistant: "``, then the response
and the end-of-sequence token. Only response tokens count in the loss.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "ChatExample",
    "DataError",
    "TokenizedExample",
    "Batch",
    "DataSource",
    "ACCEPTED_COLUMNS",
    "read_chats",
    "read_chat_jsonl",
    "Shard",
    "iter_shards",
    "load_chats",
    "load_chat_jsonl",
    "write_chat_jsonl",
    "write_kept",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_kept",
    "collate",
    "iter_batches",
    "plain_prompt_text",
]


#: Where chats come from: a file or folder path (see :func:`read_chats`) or a ``datasets.Dataset``.
DataSource = Union[str, Path, "Dataset"]


class DataError(ValueError):
    """A data file or example cannot be used; the message names the file and line or the example id."""


@dataclass(frozen=True)
class ChatExample:
    """One chat: ``messages`` up to and including the final assistant turn."""

    id: str
    messages: tuple[dict, ...]

    @property
    def prompt_messages(self) -> tuple[dict, ...]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt(self) -> str:
        """The last user turn (what a reader calls the prompt)."""
        users = [m["content"] for m in self.prompt_messages if m["role"] == "user"]
        return users[-1] if users else ""

    @classmethod
    def from_pair(cls, id: str, prompt: str, response: str) -> "ChatExample":
        return cls(id, ({"role": "user", "content": prompt}, {"role": "assistant", "content": response}))


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


#: What a record (a JSONL line or a table row) may hold, as error messages name it.
ACCEPTED_COLUMNS = ("a 'messages' list of {role, content}, or 'prompt' with 'completion' or 'response' "
                    "(each a string or a list of {role, content})")
_ROWS_PER_CHUNK = 1024  # table rows turned into Python objects at a time


def _chat_keys(names: Iterable[str]) -> list[str] | None:
    """The keys (a record's, or a table's columns) a chat is read from: ``messages``, else ``prompt`` with
    ``completion`` (or else ``response``); None when there are none of these."""
    names = set(names)
    if "messages" in names:
        return ["messages"]
    if "prompt" in names:
        answer = next((key for key in ("completion", "response") if key in names), None)
        if answer is not None:
            return ["prompt", answer]
    return None


def _turns(value: object, role: str, key: str, where: str) -> list:
    """A ``prompt``/``completion``/``response`` value as messages: a string is one turn of ``role``."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")


def _parse_messages(obj: object, where: str) -> tuple[dict, ...]:
    """The chat of one record: its ``messages``, or its ``prompt`` followed by its ``completion``/``response``.

    The chat must end with the assistant turn that is scored, after at least one prompt turn."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with {ACCEPTED_COLUMNS}")
    keys = _chat_keys(obj)
    if keys is None:
        raise DataError(f"{where}: expected an object with {ACCEPTED_COLUMNS}; it has {', '.join(map(repr, obj))}")
    if keys == ["messages"]:
        messages = obj["messages"]
    else:
        prompt, answer = keys
        messages = _turns(obj[prompt], "user", prompt, where) + _turns(obj[answer], "assistant", answer, where)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    cleaned = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must have string 'role' and 'content'")
        cleaned.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in cleaned):
        raise DataError(f"{where}: no assistant turn")
    if cleaned[-1]["role"] != "assistant":
        raise DataError(f"{where}: the chat ends with a {cleaned[-1]['role']!r} turn after its last assistant turn; "
                        "the response scored is the final turn, so end the chat with the assistant's answer")
    if len(cleaned) == 1:
        raise DataError(f"{where}: no prompt before the assistant's response")
    return tuple(cleaned)


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
                yield ChatExample(f"{path.name}:{lineno}", _parse_messages(obj, where)), line
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
    """The columns a table's chats are read from (:func:`_chat_keys`)."""
    keys = _chat_keys(names)
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
                    example = ChatExample(f"{name}:{row}", _parse_messages(record, f"{where}, row {row}"))
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


def iter_shards(source: DataSource, shard_size: int, limit: int | None = None) -> Iterator[Shard]:
    """Stream a data source (any that :func:`read_chats` reads) as shards of ``shard_size`` examples (the last may
    be shorter), reading at most ``limit`` examples. Only one shard is held in memory at a time."""
    import hashlib

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    examples, digest, index, seen = [], hashlib.sha256(), 0, 0
    for example, line in _read_examples(source):
        if limit is not None and seen >= limit:
            break
        seen += 1
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


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response; ``response_start`` is the index of the first response token."""

    id: str
    input_ids: tuple[int, ...]
    response_start: int

    @property
    def n_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


def plain_prompt_text(messages: Sequence[dict]) -> str:
    """The plain (no chat template) rendering of prompt turns, ending with ``"Assistant: "``."""
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns + "Assistant: "


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_template_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    # transformers >= 5 returns a BatchEncoding by default (return_dict=True); ask for plain ids.
    out = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return [int(i) for i in out]


def _template_ids(tokenizer, messages: Sequence[dict], id: str) -> tuple[list[int], int]:
    if _has_chat_template(tokenizer):
        prompt = _chat_template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        full = _chat_template_ids(tokenizer, messages, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise DataError(f"example {id}: the chat template does not render the prompt as a prefix of the chat")
        return full, len(prompt)
    prompt_ids = list(tokenizer.encode(plain_prompt_text(messages[:-1]), add_special_tokens=False))
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = list(tokenizer.encode(messages[-1]["content"], add_special_tokens=False))
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids + response_ids, len(prompt_ids)


def tokenize_example(example: ChatExample, tokenizer, max_length: int) -> TokenizedExample:
    """Tokenise one chat; truncation keeps the first ``max_length`` tokens.

    Raises :class:`DataError` when truncation leaves no response token (name, lengths and the fix).
    """
    ids, start = _template_ids(tokenizer, example.messages, example.id)
    if len(ids) == start:
        raise DataError(f"example {example.id}: the response is empty after tokenisation")
    if start >= max_length:
        raise DataError(
            f"example {example.id}: the response is truncated away (prompt has {start} tokens, "
            f"max_length={max_length}); raise max_length or shorten the prompt"
        )
    return TokenizedExample(example.id, tuple(ids[:max_length]), start)


def tokenize_kept(
    examples: Iterable[ChatExample], tokenizer, max_length: int = 512, skip_truncated: bool = False
) -> tuple[list[TokenizedExample], list[str]]:
    """Tokenise many examples: the kept ones and the ids of those skipped because ``skip_truncated`` drops an
    example whose response is truncated away (otherwise that raises). The result may be empty."""
    out, skipped = [], []
    for ex in examples:
        try:
            out.append(tokenize_example(ex, tokenizer, max_length))
        except DataError:
            if not skip_truncated:
                raise
            skipped.append(ex.id)
    return out, skipped


def tokenize_examples(
    examples: Iterable[ChatExample], tokenizer, max_length: int = 512, skip_truncated: bool = False
) -> list[TokenizedExample]:
    """Tokenise many examples. With ``skip_truncated`` an example whose response is truncated away is
    dropped (and counted in a warning) instead of raising. Raises if nothing usable remains."""
    out, skipped = tokenize_kept(examples, tokenizer, max_length, skip_truncated)
    if skipped:
        import warnings

        warnings.warn(f"skipped {len(skipped)} examples whose response was truncated away (first: {skipped[0]})")
    if not out:
        raise DataError("the dataset has no usable examples" + (f" ({len(skipped)} truncated away)" if skipped else ""))
    return out


@dataclass
class Batch:
    """A right-padded batch. ``response_mask[b, t]`` is True where token t of example b is a response token."""

    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor = field(repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def last_prompt_index(self) -> torch.Tensor:
        """Index of the last prompt token of each example."""
        return self.response_mask.float().argmax(dim=1) - 1

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.lengths.to(device),
        )


def collate(examples: Sequence[TokenizedExample], pad_token_id: int = 0) -> Batch:
    """Right-pad tokenised examples into a :class:`Batch`.

    Right padding leaves every real token's computation unchanged in a causal model, which is why
    scores do not depend on the batch size.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    width = int(lengths.max())
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    response = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        response[i, e.response_start : n] = True
    return Batch([e.id for e in examples], input_ids, attention, response, lengths)


def iter_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_token_id: int = 0, order: Sequence[int] | None = None
) -> Iterator[Batch]:
    """Yield batches of ``batch_size`` in the given order (default: file order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = list(range(len(examples))) if order is None else list(order)
    for s in range(0, len(idx), batch_size):
        yield collate([examples[i] for i in idx[s : s + batch_size]], pad_token_id)
