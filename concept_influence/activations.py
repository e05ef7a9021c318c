"""Activations at a hook over a dataset, reduced per example with :mod:`probes.activations`' token reductions."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from probes.activations import REDUCTIONS, Activations, reduce_tokens

from .data import TokenizedExample, iter_batches
from .models import ModelAdapter

__all__ = ["collect_activations"]


@torch.no_grad()
def collect_activations(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    hook_name: str,
    reduction: str = "response_mean",
    batch_size: int = 16,
    progress: bool = True,
) -> Activations:
    """Activations at ``hook_name`` for every example, reduced per example (``response_mean``,
    ``last_prompt``) or kept per token (``all_tokens``). The forward stops after the hook's block."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    adapter.check_hook(hook_name)
    rows, index, ids = [], [], []
    batches = iter_batches(examples, batch_size, adapter.pad_token_id)
    n_batches = (len(examples) + batch_size - 1) // batch_size
    for batch in tqdm(batches, total=n_batches, desc=f"activations {hook_name}", disable=not progress, leave=False):
        acts = adapter.activations(batch, hook_name).float().cpu()
        if reduction == "all_tokens":
            mask = batch.attention_mask.bool()
            rows.append(acts[mask])
            index.append(torch.arange(len(ids), len(ids) + len(batch)).unsqueeze(1).expand_as(mask)[mask])
        else:
            rows.append(reduce_tokens(acts, batch, reduction))
        ids.extend(batch.ids)
    values = torch.cat(rows) if rows else torch.empty(0, adapter.hook_width(hook_name))
    return Activations(values, ids, hook_name, reduction, torch.cat(index) if index else None)
