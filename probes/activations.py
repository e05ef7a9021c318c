"""Reduced activations and the token reductions that produce them, on tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["REDUCTIONS", "Activations", "TokenBatch", "reduce_tokens", "token_mask"]

REDUCTIONS = ("response_mean", "last_prompt", "prompt_mean", "all_tokens")


class TokenBatch(Protocol):
    """What the reductions read from a right-padded batch of ``B`` examples of ``T`` tokens: ``response_mask``
    and ``attention_mask`` ``[B, T]``, ``last_prompt_index`` ``[B]`` and ``len(batch) == B``."""

    response_mask: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def last_prompt_index(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...


def token_mask(batch: TokenBatch, reduction: str) -> torch.Tensor:
    """Boolean ``[B, T]`` mask of the tokens a reduction reads: response tokens (``response_mean``),
    the last prompt token (``last_prompt``), every prompt token (``prompt_mean``) or every real token
    (``all_tokens``)."""
    if reduction == "response_mean":
        return batch.response_mask
    if reduction == "last_prompt":
        mask = torch.zeros_like(batch.response_mask)
        mask[torch.arange(len(batch), device=mask.device), batch.last_prompt_index] = True
        return mask
    if reduction == "prompt_mean":
        return batch.attention_mask.bool() & ~batch.response_mask.bool()
    if reduction == "all_tokens":
        return batch.attention_mask.bool()
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def reduce_tokens(acts: torch.Tensor, batch: TokenBatch, reduction: str) -> torch.Tensor:
    """Reduce ``[B, T, ...]`` per-token values to one row per example (mean over the reduction's
    tokens); for ``all_tokens`` the mean runs over every real token. Keeps the autograd graph."""
    mask = token_mask(batch, reduction).to(acts.device)
    w = mask.to(acts.dtype)
    w = w / w.sum(1, keepdim=True).clamp_min(1)
    return torch.einsum("bt,bt...->b...", w, acts)


@dataclass
class Activations:
    """Reduced activations: ``values[i]`` belongs to example ``ids[i]``; for ``all_tokens`` rows are
    tokens and ``example_index[r]`` is the position in ``ids`` of row r's example."""

    values: torch.Tensor
    ids: list[str]
    hook_name: str
    reduction: str
    example_index: torch.Tensor | None = None
