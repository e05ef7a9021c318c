"""Scores summed over checkpoints of the training run (the base model, intermediate checkpoints, the final model)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from ..data import TokenizedExample
from ..models import ModelAdapter, checkpointed_weights, load_checkpoint
from ..scores import Scores
from .base import Estimator

__all__ = ["OverCheckpoints", "describe_checkpoint"]


class OverCheckpoints(Estimator):
    """The sum of an estimator's scores at several checkpoints of the training run: TracIn-CP (Pruthi et al.,
    2020), with the curvature fitted again at each checkpoint as in SOURCE (Bae et al., 2024).

    Influence at the final model alone is a first-order account of training at its end, where the data that
    caused a behaviour is already learned and its gradients are small; summed over checkpoints it follows the
    whole run. ``make_estimator()`` returns a fresh estimator for each checkpoint (give the curvature as a
    strategy name, e.g. ``ConceptInfluence(concept, "ekfac", fit_examples=pool)``, so that it is fitted on that
    checkpoint). The concept (its direction and evaluation texts) stays the one given: its gradient is taken at
    each checkpoint. ``checkpoints`` holds what :func:`~concept_influence.models.load_checkpoint` reads (state
    dicts, safetensors files, model or PEFT adapter folders); ``None`` stands for the model's own weights, so
    ``[base_weights, None]`` sums over the base and the fine-tuned model. ``weights`` multiply each checkpoint's
    scores (e.g. its learning rate times its steps; default 1). The model's own weights are restored afterwards,
    also on error."""

    def __init__(self, make_estimator: Callable[[], Estimator], checkpoints: Sequence, *,
                 weights: Sequence[float] | None = None, name: str | None = None):
        if not checkpoints:
            raise ValueError("OverCheckpoints needs at least one checkpoint")
        if weights is not None and len(weights) != len(checkpoints):
            raise ValueError(f"{len(weights)} weights for {len(checkpoints)} checkpoints")
        self.make_estimator, self.checkpoints, self.weights = make_estimator, list(checkpoints), weights
        self.name = name or f"{make_estimator().name}[checkpoints]"

    def score(self, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *, batch_size: int = 8,
              progress: bool = True) -> Scores:
        own = checkpointed_weights(adapter)
        parts = []
        try:
            for checkpoint in self.checkpoints:
                adapter.model.load_state_dict(own, strict=False)
                if checkpoint is not None:
                    load_checkpoint(adapter, checkpoint)
                parts.append(self.make_estimator().score(adapter, examples, batch_size=batch_size, progress=progress))
        finally:
            adapter.model.load_state_dict(own, strict=False)
        metadata = {**parts[0].metadata, "checkpoints": [describe_checkpoint(c) for c in self.checkpoints],
                    "checkpoint_weights": list(self.weights or [1.0] * len(parts))}
        return Scores.weighted_sum(parts, self.weights, estimator=self.name, metadata=metadata)


def describe_checkpoint(checkpoint) -> str:
    """How a report names a checkpoint given to :class:`OverCheckpoints`."""
    if checkpoint is None:
        return "the model's own weights"
    return "weights given in memory" if isinstance(checkpoint, Mapping) else str(checkpoint)
