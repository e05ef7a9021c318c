"""The estimator interface: configure once, then ``score(adapter, examples) -> Scores``."""

from __future__ import annotations

from typing import Sequence

from ..data import TokenizedExample
from ..models import ModelAdapter
from ..scores import Scores

__all__ = ["Estimator"]


class Estimator:
    """Scores training examples; positive means training on the example pushes the measurement up."""

    name: str = "estimator"
    #: What a run folder passes to the constructor, in this order, to make the estimator from its config:
    #: ``"readout"`` (the concept measured on each example itself), ``"concept"`` (the concept averaged over its
    #: evaluation texts), ``"curvature"`` (the run's factors). None: a run config cannot name this estimator.
    run_inputs: tuple[str, ...] | None = None
    #: Whether :meth:`score` also scores the stability variants of the estimator's curvature (:func:`~concept_influence.
    #: curvature.stability_variants`) in the same pass, into :attr:`variants_`; only gradient estimators can.
    variants: bool = False
    #: The variants' scores of the last :meth:`score` call (columns ``variant:column``), when :attr:`variants`.
    variants_: Scores | None = None

    def score(self, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *, batch_size: int = 8,
              progress: bool = True) -> Scores:
        """Score every example of ``examples`` (one row each, in order)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
