"""Gradient estimators: Concept Influence (EK-FAC), concept gradient-dot (identity curvature), and
classic influence functions on the loss of test examples (EK-FAC or identity).

All use one formula, score(z) = −∇f(θ)ᵀ (G + λI)⁻¹ ∇L(z), with f the concept function or minus the mean
test loss, and the streaming engine :func:`concept_influence.engine.score_with_queries`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..concepts import ConceptError, ConceptFunction, Projection, measurement_gradient
from ..curvature import Curvature, CurvatureSettings, fit_curvature, stability_variants, variant_kinds
from ..data import TokenizedExample
from ..engine import Query, ScoringSettings, low_rank_queries, score_with_queries, stack_queries
from ..models import LinearMap, ModelAdapter
from ..scores import Scores
from .base import Estimator

__all__ = ["GradientEstimator", "ConceptInfluence", "ConceptGradDot", "InfluenceFunction", "GradDot"]


def test_loss_gradient(adapter: ModelAdapter, examples: Sequence[TokenizedExample], maps: Sequence[LinearMap],
                       loss_tokens: str, batch_size: int, progress: bool, what: str,
                       projections: Mapping[str, Projection] | None = None) -> dict[str, torch.Tensor]:
    """The gradient of minus the mean loss of ``examples`` at each map (``[1, d_out, d_in]``): classic influence's
    measurement, for test examples or the behaviour's own."""
    return measurement_gradient(adapter, examples, maps, lambda b: -adapter.per_example_loss(b, loss_tokens)[:, None],
                                1, what, batch_size, progress, projections)


class GradientEstimator(Estimator):
    """``−∇fᵀ P ∇L(z)`` with P the damped inverse curvature (``"ekfac"``, ``"kfac"``), none
    (``"identity"``), or a fitted :class:`Curvature`. When a strategy name is given, the curvature is
    fitted on ``fit_examples`` (default: the scored examples) as ``fit`` says (:class:`CurvatureSettings`; its
    strategy is ``curvature``) and kept in ``self.curvature_``. ``scoring`` (:class:`ScoringSettings`; single changes as keywords:
    ``loss_tokens``, ``per_module``, ``per_token``, ``query_rank``) says how to score; ``score``'s ``batch_size`` wins.

    ``variants=True``: ``score`` also scores, in the same pass over the examples, the query preconditioned by each
    stability variant of the curvature (:func:`~concept_influence.curvature.stability_variants`: damping × 0.01 … ×
    100 or horizon ÷ 10 and × 10, and identity) as extra query columns, returned apart in ``variants_`` (columns
    ``variant:column``, no per-module or per-token shares; ``metadata["variants"]``: each variant's kind) for
    :func:`~concept_influence.stability.check_stability`. The queries then take 1 + (number of variants) times the
    memory; the pass costs little more (the engine contracts K queries through each example's gradient when K is
    large), but with ``per_token`` each token is dotted with every column. ``behaviour`` (with ``variants``): examples
    that show the behaviour; their own ranking, classic gradient-dot on their loss (:class:`GradDot` over the same
    maps), is one more column of ``variants_`` (``behaviour``, kind ``behaviour``), the comparison that catches a
    concept which does not follow the behaviour."""

    def __init__(self, curvature: str | Curvature = "ekfac", *, fit_examples: Sequence[TokenizedExample] | None = None,
                 fit: CurvatureSettings | None = None, scoring: ScoringSettings | None = None, variants: bool = False,
                 behaviour: Sequence[TokenizedExample] | None = None, **scoring_changes: Any):
        if behaviour is not None and not variants:
            raise ValueError("behaviour examples are compared in the stability check: pass variants=True with them")
        self.curvature, self.variants = curvature, variants
        self.behaviour = list(behaviour) if behaviour else None
        self.fit_examples = fit_examples
        self.fit = fit or CurvatureSettings()
        self.scoring = (scoring or ScoringSettings()).replace(**scoring_changes)
        self.curvature_: Curvature | None = curvature if isinstance(curvature, Curvature) else None
        self._queries: tuple | None = None

    # subclasses: which maps, and the gradient of the measurement f at each map ([K, d_out, d_in], or projected as
    # concepts.measurement_gradient says for the maps in `projections`)
    def tracked_maps(self, adapter: ModelAdapter) -> list[LinearMap]:
        raise NotImplementedError

    def measurement(self, adapter: ModelAdapter, maps: Sequence[LinearMap], batch_size: int, progress: bool,
                    projections: Mapping[str, Projection] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
        raise NotImplementedError

    def fitted_curvature(self, adapter: ModelAdapter, maps: Sequence[LinearMap],
                         examples: Sequence[TokenizedExample], batch_size: int, progress: bool) -> Curvature:
        if self.curvature_ is None:
            self.curvature_ = fit_curvature(adapter, self.fit_examples or examples, list(maps), self.fit,
                                            strategy=self.curvature, batch_size=batch_size, progress=progress)
        return self.curvature_

    def preconditioned_queries(self, adapter: ModelAdapter, curvature: Curvature, maps: Sequence[LinearMap],
                               batch_size: int, progress: bool) -> tuple[dict[str, Query], list[str]]:
        """``(G + λI)⁻¹ ∇f`` per map (of rank ``scoring.query_rank``) and the column names, computed once per
        model state, curvature and rank, so scoring a dataset shard by shard does not recompute them. With
        ``variants``, each map's K queries are followed by the K of each stability variant (preconditioned map by
        map, so no second full set of queries is held while they are stacked), then the behaviour's gradient."""
        rank = self.scoring.query_rank
        key = (adapter.fingerprint(), curvature, tuple(m.name for m in maps), rank)  # (variants, behaviour: fixed)
        if self._queries is None or self._queries[0] != key:
            self._queries = None  # (the old queries are freed before the new ones are formed)
            grads, columns = self.measurement(adapter, maps, batch_size, progress)
            curvatures = [curvature, *(stability_variants(curvature).values() if self.variants else ())]
            behaviour = (test_loss_gradient(adapter, self.behaviour, maps, self.scoring.loss_tokens, batch_size,
                                            progress, "the behaviour's loss") if self.behaviour else {})
            queries = {}
            for name in list(grads):
                one = {name: grads.pop(name)}
                sets = [low_rank_queries(c.precondition(one), rank) for c in curvatures]
                if behaviour:
                    sets.append(low_rank_queries({name: behaviour.pop(name)}, rank))
                queries[name] = stack_queries(sets)[name]
            self._queries = (key, queries, columns)
        return self._queries[1], self._queries[2]

    def score(self, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *, batch_size: int = 8,
              progress: bool = True) -> Scores:
        maps = self.tracked_maps(adapter)
        curvature = self.fitted_curvature(adapter, maps, examples, batch_size, progress)
        curvature.check_model(adapter)
        queries, columns = self.preconditioned_queries(adapter, curvature, maps, batch_size, progress)
        meta = {"curvature": curvature.strategy, "maps": [m.name for m in maps], "fisher": curvature.fisher}
        kinds = variant_kinds(curvature) if self.variants else {}
        extra = [f"{variant}:{column}" for variant in kinds for column in columns]
        if self.behaviour:
            kinds, extra = {**kinds, "behaviour": "behaviour"}, [*extra, "behaviour"]
        scored = score_with_queries(adapter, examples, maps, queries, self.scoring.replace(batch_size=batch_size),
                                    estimator=self.name, columns=[*columns, *extra], sign=-1.0, metadata=meta,
                                    progress=progress)
        if not self.variants:
            return scored
        self.variants_ = scored.select(extra, shares=False, metadata={**scored.metadata, "variants": kinds})
        return scored.select(columns)


class ConceptInfluence(GradientEstimator):
    """Concept Influence: how much training on z moves the concept, CI(z) = −∇fᵀ(G+λI)⁻¹∇L(z).
    Only maps in blocks up to the concept's layer are tracked (no gradient reaches later ones)."""

    name = "concept_influence"
    run_inputs = ("concept", "curvature")

    def __init__(self, concept: ConceptFunction, curvature: str | Curvature = "ekfac", **kwargs):
        super().__init__(curvature, **kwargs)
        self.concept = concept
        if not concept.eval_examples:
            raise ConceptError("the concept needs evaluation examples: ConceptFunction(..., eval_examples=...)")

    def tracked_maps(self, adapter):
        self.concept.check(adapter)
        maps = adapter.linear_maps(max_block=self.concept.layer)
        if not maps:
            raise ConceptError(f"no linear map is tracked for a concept at {self.concept.hook_name}")
        return maps

    def measurement(self, adapter, maps, batch_size, progress, projections=None):
        grads = self.concept.gradient(adapter, maps, batch_size=batch_size, progress=progress, projections=projections)
        return grads, self.concept.names


class ConceptGradDot(ConceptInfluence):
    """Concept Influence with identity curvature: −∇fᵀ∇L(z) (the first-order change of f after one SGD
    step on z, divided by the learning rate)."""

    name = "concept_grad_dot"
    run_inputs = ("concept",)

    def __init__(self, concept: ConceptFunction, **kwargs):
        super().__init__(concept, "identity", **kwargs)


class InfluenceFunction(GradientEstimator):
    """Classic influence on the mean loss of ``test_examples``: ∇L_testᵀ(G+λI)⁻¹∇L(z), positive when
    training on z lowers the test loss. All blocks are tracked."""

    name = "influence_function"

    def __init__(self, test_examples: Sequence[TokenizedExample], curvature: str | Curvature = "ekfac", **kwargs):
        super().__init__(curvature, **kwargs)
        if not test_examples:
            raise ValueError(f"{self.name} needs at least one test example")
        self.test_examples = list(test_examples)

    def tracked_maps(self, adapter):
        return adapter.linear_maps()

    def measurement(self, adapter, maps, batch_size, progress, projections=None):
        grads = test_loss_gradient(adapter, self.test_examples, maps, self.scoring.loss_tokens, batch_size, progress,
                                   "the test loss", projections)
        return grads, ["test_loss"]


class GradDot(InfluenceFunction):
    """Influence on the test loss with identity curvature: ∇L_testᵀ∇L(z)."""

    name = "grad_dot"

    def __init__(self, test_examples: Sequence[TokenizedExample], **kwargs):
        super().__init__(test_examples, "identity", **kwargs)
