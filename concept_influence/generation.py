"""Batched, seeded sampling of the model's own responses (for the projection-difference estimator).

Prompts are grouped by length so that each batch needs no padding, and each batch is decoded with the
adapter's key-value cache (``ModelAdapter.extend``), one token per step. Each example draws from its own
generator seeded by (seed, example id), so the samples do not depend on the batch size or order.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import TokenizedExample
from .errors import ConceptInfluenceError
from .models import ModelAdapter

__all__ = ["GenerationError", "sample_responses"]


class GenerationError(ConceptInfluenceError, RuntimeError):
    """Sampling failed for some examples; the message names them."""


def _generator(seed: int, example_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(example_id.encode()))


def _sample_batch(adapter: ModelAdapter, chunk: Sequence[TokenizedExample], max_new_tokens: int, temperature: float,
                  seed: int, eos: int | None, min_new_tokens: int) -> list[list[int]]:
    """New tokens for prompts of one length (EOS included when sampled)."""
    prompt_len = chunk[0].response_start
    budget = max_new_tokens if adapter.context_length is None else min(max_new_tokens, adapter.context_length - prompt_len)
    gens = [_generator(seed, e.id) for e in chunk]
    new: list[list[int]] = [[] for _ in chunk]
    done = [False] * len(chunk)
    tokens = torch.tensor([list(e.input_ids[:prompt_len]) for e in chunk])
    cache = None
    for position in range(budget):
        logits, cache = adapter.extend(tokens, cache)
        logits = logits.float().cpu() / temperature
        if eos is not None and position < min_new_tokens:
            logits[:, eos] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        step = [int(torch.multinomial(probs[b], 1, generator=gens[b])) for b in range(len(chunk))]
        for b, token in enumerate(step):
            if not done[b]:
                new[b].append(token)
                done[b] = token == eos
        if all(done):
            break
        tokens = torch.tensor(step).unsqueeze(1)
    return new


@torch.no_grad()
def sample_responses(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    min_new_tokens: int = 0,
) -> list[TokenizedExample]:
    """For each example, the same prompt followed by a response sampled from the model (ending with EOS
    when the model emits it within ``max_new_tokens``; EOS cannot be sampled before ``min_new_tokens``), in the
    input order with the same ids.
    Raises :class:`GenerationError` naming the examples whose generation produced no token before EOS."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eos = getattr(adapter.tokenizer, "eos_token_id", None)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_length[e.response_start].append(i)
    chunks = [idx[s : s + batch_size] for _, idx in sorted(by_length.items()) for s in range(0, len(idx), batch_size)]
    out: list[TokenizedExample | None] = [None] * len(examples)
    for idx in tqdm(chunks, desc="sample responses", disable=not progress, leave=False):
        chunk = [examples[i] for i in idx]
        for i, e, new in zip(idx, chunk, _sample_batch(adapter, chunk, max_new_tokens, temperature, seed, eos,
                                                                   min_new_tokens)):
            out[i] = TokenizedExample(e.id, e.input_ids[: e.response_start] + tuple(new), e.response_start)
    empty = [e.id for e in out if e.n_response_tokens == 0 or e.input_ids[e.response_start] == eos]
    if empty:
        raise GenerationError(f"the model's generation produced no tokens for {len(empty)} example(s) "
                              f"(first: {', '.join(empty[:5])}); raise temperature or max_new_tokens, or check the prompts")
    return out
