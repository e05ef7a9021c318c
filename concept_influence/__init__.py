"""concept-influence: which training examples put a concept into a language model."""

from .data import (
    Batch,
    ChatExample,
    DataError,
    TokenizedExample,
    collate,
    iter_batches,
    load_chat_jsonl,
    load_chats,
    read_chat_jsonl,
    read_chats,
    tokenize_examples,
)
from .errors import ConceptInfluenceError
from .models import HFCausalLMAdapter, HookedTransformerAdapter, HookError, LinearMap, ModelAdapter, as_adapter

__version__ = "0.1.0"

__all__ = [
    "ConceptInfluenceError",
    "Batch", "ChatExample", "DataError", "TokenizedExample", "collate", "iter_batches", "load_chat_jsonl",
    "load_chats", "read_chat_jsonl", "read_chats", "tokenize_examples",
    "HFCausalLMAdapter", "HookedTransformerAdapter", "HookError", "LinearMap", "ModelAdapter", "as_adapter",
]
