"""One chat record: :class:`ChatExample`, the error bad data raises, and how a record (a JSONL line or a table row)
becomes a chat that ends with the assistant's answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import ConceptInfluenceError

__all__ = ["DataError", "ChatExample", "ACCEPTED_COLUMNS", "EMPTY_ANSWER", "chat_keys",
           "parse_messages"]


class DataError(ConceptInfluenceError, ValueError):
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


#: Why a chat whose final answer is empty or blank is refused (it would be scored on its end-of-sequence token alone).
EMPTY_ANSWER = ("the assistant's answer (the response that is scored) is empty; remove the example or give it an "
                "answer")
#: What a record (a JSONL line or a table row) may hold, as error messages name it.
ACCEPTED_COLUMNS = ("a 'messages' list of {role, content}, or 'prompt' with 'completion' or 'response' "
                    "(each a string or a list of {role, content})")


def chat_keys(names: Iterable[str]) -> list[str] | None:
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


def parse_messages(obj: object, where: str) -> tuple[dict, ...]:
    """The chat of one record: its ``messages``, or its ``prompt`` followed by its ``completion``/``response``.

    The chat must end with a non-empty assistant turn (the response scored), after at least one prompt turn."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with {ACCEPTED_COLUMNS}")
    keys = chat_keys(obj)
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
    if not cleaned[-1]["content"].strip():
        raise DataError(f"{where}: {EMPTY_ANSWER}")
    return tuple(cleaned)
