"""Forward-only (first-order) estimators: probe projection and projection difference.

They read each training example on its own response tokens (``reduction="response_mean"`` by default), whatever
the concept's query: training on z teaches its answer, and a last-prompt query would read only z's prompt."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..concepts import ConceptFunction
from ..data import TokenizedExample, iter_batches
from ..generation import sample_responses
from ..models import ModelAdapter
from ..scores import Scores
from .base import Estimator

__all__ = ["ProbeProjection", "ProjectionDifference", "concept_readouts"]


@torch.no_grad()
def concept_readouts(adapter: ModelAdapter, examples: Sequence[TokenizedExample], concept: ConceptFunction,
                     batch_size: int = 16, progress: bool = True, desc: str = "readout",
                     reduction: str | None = None) -> np.ndarray:
    """The concept's readout on each example itself, ``[N, K]``, over the tokens of ``reduction`` (default: the
    concept's query); the forward stops at the concept's block."""
    concept.check(adapter)
    rows = []
    n_batches = (len(examples) + batch_size - 1) // batch_size
    for batch in tqdm(iter_batches(examples, batch_size, adapter.pad_token_id), total=n_batches, desc=desc,
                      disable=not progress):
        rows.append(concept.per_example(adapter, batch, reduction).double().cpu().numpy())
    return np.concatenate(rows)


class ProbeProjection(Estimator):
    """s(z) = the concept's readout on z's own tokens of ``reduction`` (default: the mean of ⟨v̂, h_ℓ,t⟩ over its
    response). The concept's evaluation examples and query are not used: the training example is its own
    measurement."""

    name = "probe_projection"
    run_inputs = ("readout",)

    def __init__(self, concept: ConceptFunction, reduction: str = "response_mean"):
        self.concept = concept
        self.reduction = reduction

    def score(self, adapter, examples, *, batch_size: int = 16, progress: bool = True) -> Scores:
        values = concept_readouts(adapter, examples, self.concept, batch_size, progress, f"score {self.name}",
                                  self.reduction)
        return Scores([e.id for e in examples], values, self.name, self.concept.names,
                      {"hook_name": self.concept.hook_name, "reduction": self.reduction})


class ProjectionDifference(Estimator):
    """Persona-vector filtering: s(z) = readout(x_z, y_z) − readout(x_z, ŷ_z), with ŷ_z the model's own
    response to z's prompt, sampled (seeded, batched) with ``min_new_tokens`` to ``max_new_tokens`` tokens; both
    read over ``reduction`` (default: the response tokens)."""

    name = "projection_difference"

    def __init__(self, concept: ConceptFunction, max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                 min_new_tokens: int = 0, reduction: str = "response_mean"):
        self.concept = concept
        self.reduction = reduction
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.temperature = temperature
        self.seed = seed

    def score(self, adapter, examples, *, batch_size: int = 16, progress: bool = True) -> Scores:
        own = sample_responses(adapter, examples, self.max_new_tokens, self.temperature, self.seed, batch_size, progress,
                               self.min_new_tokens)
        data = concept_readouts(adapter, examples, self.concept, batch_size, progress, f"score {self.name}",
                                self.reduction)
        model = concept_readouts(adapter, own, self.concept, batch_size, progress, f"score {self.name} (own)",
                                 self.reduction)
        meta = {"hook_name": self.concept.hook_name, "reduction": self.reduction, "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.min_new_tokens,
                "temperature": self.temperature, "seed": self.seed}
        return Scores([e.id for e in examples], data - model, self.name, self.concept.names, meta)
