"""Chat data: JSONL in the Hugging Face messages format -> token batches with response masks.

An example is one line ``{"messages": [{"role": ..., "content": ...}, ...]}``. The *response* is the
last assistant turn; the *prompt* is everything before it. Example ids are ``"<file name>:<line>"``
(1-based line numbers), stable across runs and batch sizes.

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
from typing import Iterable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "ChatExample",
    "DataError",
    "TokenizedExample",
    "Batch",
    "read_chat_jsonl",
    "Shard",
    "iter_shards",
    "load_chat_jsonl",
    "write_chat_jsonl",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_kept",
    "collate",
    "iter_batches",
    "plain_prompt_text",
]


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


def _parse_messages(obj: object, where: str) -> tuple[dict, ...]:
    if not isinstance(obj, dict) or "messages" not in obj:
        raise DataError(f"{where}: expected an object with a 'messages' list")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    cleaned = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must have string 'role' and 'content'")
        cleaned.append({"role": m["role"], "content": m["content"]})
    last_assistant = max((i for i, m in enumerate(cleaned) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise DataError(f"{where}: no assistant turn")
    return tuple(cleaned[: last_assistant + 1])


def _read_examples(path: str | Path) -> Iterator[tuple[ChatExample, str]]:
    """Stream ``(example, raw line)`` pairs; see :func:`read_chat_jsonl` for the errors."""
    path = Path(path)
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


def read_chat_jsonl(path: str | Path) -> Iterator[ChatExample]:
    """Stream the examples of a ``.jsonl`` or ``.jsonl.gz`` file; blank lines are skipped.

    Raises :class:`DataError` naming the file and line for a missing file, bad JSON, a line without
    ``messages`` or without an assistant turn.
    """
    for example, _ in _read_examples(path):
        yield example


@dataclass(frozen=True)
class Shard:
    """``size`` consecutive examples of a file; ``digest`` is the SHA-256 of their raw lines, so a saved
    result for the shard can be reused exactly when its input is unchanged."""

    index: int
    examples: list[ChatExample]
    digest: str


def iter_shards(path: str | Path, shard_size: int, limit: int | None = None) -> Iterator[Shard]:
    """Stream a chat JSONL file as shards of ``shard_size`` examples (the last may be shorter), reading at
    most ``limit`` examples. Only one shard is held in memory at a time."""
    import hashlib

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    examples, digest, index, seen = [], hashlib.sha256(), 0, 0
    for example, line in _read_examples(path):
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


def load_chat_jsonl(path: str | Path, limit: int | None = None) -> list[ChatExample]:
    """Read up to ``limit`` examples of a chat JSONL file into a list."""
    out = []
    for ex in read_chat_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(ex)
    return out


def write_chat_jsonl(examples: Iterable[ChatExample], path: str | Path) -> Path:
    """Write examples as chat JSONL (gzip when the name ends in ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"messages": list(ex.messages)}, ensure_ascii=False) + "\n")
    return path


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
