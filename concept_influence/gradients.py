"""The one gradient pipeline: batches -> each tracked map's inputs ``a`` and output gradients ``g``.

Per batch: one forward with the maps' inputs captured, the per-example loss (data labels, or labels
sampled from the model for the true Fisher), and one backward of ``Σ_z L(z)`` so that each example's
tokens carry the gradient of its own loss. Consumers: the scoring engine (:mod:`.engine`) and the
curvature fitter (:mod:`.curvature.fit`).
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .data import Batch, TokenizedExample, iter_batches
from .models import LinearMap, ModelAdapter, per_token_mean_loss

__all__ = ["captured_batches", "sample_labels", "check_finite"]


def _example_generator(seed: int, example_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_labels(logits: torch.Tensor, batch: Batch, seed: int) -> torch.Tensor:
    """Next-token labels ``[B, T-1]`` drawn from ``softmax(logits)`` at each loss (response) position.

    Inverse-CDF sampling with one uniform per position of the example, drawn from a generator seeded by
    ``(seed, example id)``: an example's labels do not depend on the batch it is in, its padding, or the
    pass. Positions outside the loss keep the data's next token."""
    targets = batch.input_ids[:, 1:].clone()
    loss_mask = batch.response_mask[:, 1:]
    for b, example_id in enumerate(batch.ids):
        u = torch.rand(int(batch.lengths[b]) - 1, generator=_example_generator(seed, example_id), dtype=torch.float64)
        pos = loss_mask[b].nonzero().squeeze(-1)
        cdf = torch.softmax(logits[b, pos].float(), dim=-1).cumsum(-1)
        draw = u.to(cdf.device)[pos].to(cdf.dtype) * cdf[:, -1]
        labels = torch.searchsorted(cdf, draw.unsqueeze(-1), right=True).squeeze(-1)
        targets[b, pos] = labels.clamp_max(cdf.shape[-1] - 1)
    return targets


def check_finite(values: torch.Tensor, batch: Batch, what: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the examples of ``batch`` whose ``values`` (first dim = example) are not finite."""
    bad = ~torch.isfinite(values.reshape(len(batch), -1)).all(dim=1)
    if bad.any():
        ids = [i for i, flag in zip(batch.ids, bad.tolist()) if flag]
        raise error(f"non-finite {what} for example(s) {', '.join(ids)}")


def captured_batches(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    maps: Sequence[LinearMap],
    *,
    batch_size: int,
    loss_tokens: str = "response",
    label_seed: int | None = None,
    error: type[Exception] = RuntimeError,
    desc: str = "gradients",
    progress: bool = True,
) -> Iterator[tuple[Batch, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]]:
    """Yield ``(batch, {map name: (a [B,T,d_in], g [B,T,d_out] or None)})`` per batch, in the model's dtype:
    consumers cast one map at a time to float32 where they accumulate (a bfloat16 model's ``a`` and ``g`` are not
    all copied to float32 at once). The loss is computed in float32 from the logits.

    Labels are the data's (``label_seed=None``) or sampled from the model with that seed. ``g`` is None for a
    map that receives no gradient. Non-finite losses raise ``error`` naming the examples. Parameter
    ``.grad`` fields are not touched."""
    if not examples:
        raise ValueError("no examples")
    n_batches = -(-len(examples) // batch_size)
    with adapter.tracking(maps):
        for batch in tqdm(iter_batches(examples, batch_size, adapter.pad_token_id), total=n_batches, desc=desc,
                          disable=not progress, leave=False):
            batch = batch.to(adapter.device)
            with adapter.capture(maps) as cap:
                logits = adapter.logits(batch)
                targets = None if label_seed is None else sample_labels(logits.detach(), batch, label_seed)
                losses = per_token_mean_loss(logits, batch, loss_tokens, targets)
                check_finite(losses.detach(), batch, "loss", error)
                # w.r.t. the maps' outputs only, so no weight-gradient product is computed; the capture's
                # gradient hooks record each g
                torch.autograd.grad(losses.sum(), list(cap.outputs.values()), allow_unused=True)
            grads = cap.output_grads
            yield batch, {m.name: (cap.inputs[m.name], grads.get(m.name)) for m in maps}
