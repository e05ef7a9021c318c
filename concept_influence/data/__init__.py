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

Modules: :mod:`.chats` (one record as a chat), :mod:`.sources` (reading, sharding and writing data sources),
:mod:`.tokens` (tokenisation, batches).
"""

from .chats import ACCEPTED_COLUMNS, ChatExample, DataError
from .sources import (
    DataSource,
    Shard,
    iter_shards,
    load_chat_jsonl,
    load_chats,
    read_chat_jsonl,
    read_chats,
    write_chat_jsonl,
    write_kept,
)
from .tokens import (
    Batch,
    TokenizedExample,
    collate,
    iter_batches,
    plain_prompt_text,
    read_tokenized,
    tokenize_example,
    tokenize_examples,
    tokenize_kept,
)

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
    "read_tokenized",
    "tokenize_kept",
    "collate",
    "iter_batches",
    "plain_prompt_text",
]
