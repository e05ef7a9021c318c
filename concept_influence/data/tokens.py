"""Chats as tokens: :class:`TokenizedExample` (with the index of the first response token), the plain and chat
templates, and right-padded :class:`Batch` es with response masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .chats import EMPTY_ANSWER, ChatExample, DataError
from .sources import load_chats

__all__ = ["TokenizedExample", "plain_prompt_text", "tokenize_example", "tokenize_kept", "tokenize_examples",
           "read_tokenized", "Batch", "collate", "iter_batches"]


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


class _Truncated(DataError):
    """The response of an example is cut away at ``max_length`` (what ``skip_truncated`` skips)."""


def tokenize_example(example: ChatExample, tokenizer, max_length: int) -> TokenizedExample:
    """Tokenise one chat; truncation keeps the first ``max_length`` tokens.

    Raises :class:`DataError` for an empty answer and when truncation leaves no response token (name, lengths and
    the fix).
    """
    if not example.response.strip():
        raise DataError(f"example {example.id}: {EMPTY_ANSWER}")
    ids, start = _template_ids(tokenizer, example.messages, example.id)
    if len(ids) == start:
        raise DataError(f"example {example.id}: the response is empty after tokenisation")
    if start >= max_length:
        raise _Truncated(
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
        except _Truncated:
            if not skip_truncated:
                raise
            skipped.append(ex.id)
    return out, skipped


def tokenize_examples(
    examples: Iterable[ChatExample], tokenizer, max_length: int = 512, skip_truncated: bool = False,
    source: str | None = None,
) -> list[TokenizedExample]:
    """Tokenise many examples. With ``skip_truncated`` an example whose response is truncated away is
    dropped (and counted in a warning) instead of raising. Raises if nothing usable remains, naming ``source``
    (the file the examples were read from; default: the file named in their ids)."""
    out, skipped = tokenize_kept(examples, tokenizer, max_length, skip_truncated)
    if skipped:
        import warnings

        warnings.warn(f"skipped {len(skipped)} examples whose response was truncated away (first: {skipped[0]})")
    if not out:
        where = source or (skipped[0].rpartition(":")[0] if skipped else None)
        why = (f"all {len(skipped)} have their response cut away at max_length {max_length}" if skipped
               else "it has no examples")
        raise DataError(f"{where}: no usable examples ({why})" if where else "no examples were given")
    return out


def read_tokenized(paths: Sequence, tokenizer, max_length: int, limit: int | None = None,
                   skip_truncated: bool = True) -> list[TokenizedExample]:
    """The chats of ``paths`` (data sources :func:`~.sources.load_chats` reads; at most ``limit`` from each),
    tokenised as :func:`tokenize_examples` says; an error names the files."""
    chats = [chat for path in paths for chat in load_chats(path, limit)]
    return tokenize_examples(chats, tokenizer, max_length, skip_truncated, source=", ".join(map(str, paths)))


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
