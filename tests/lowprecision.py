"""Shared by the bfloat16 / float16 tests (tests/test_dtype.py on CPU, tests/test_gpu.py on CUDA): a model cast to a
low-precision dtype, the scores compared with the float32 model's, and the tolerances they must meet.

The tolerances, their reasons and the two measures are in concept_influence_benchmarks/lowprecision.py (the GPU
check, `make gpu-check`, applies them too)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import fit_curvature
from concept_influence.estimators import ConceptInfluence, ProbeProjection
from concept_influence_benchmarks.lowprecision import (  # noqa: F401  (the tests import them from here)
    FAST_TOLERANCE,
    INFLUENCE_TOLERANCE,
    MIN_SPEARMAN,
    relative_error,
    spearman,
)
from probes import ConceptDirection

HOOK = "blocks.1.hook_resid_post"
LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cast(adapter, dtype: torch.dtype, device: str | torch.device | None = None):
    """A copy of ``adapter``'s model converted to ``dtype`` (and moved to ``device``), in a new adapter."""
    model = copy.deepcopy(adapter.model).to(dtype)
    return type(adapter)(model.to(device) if device is not None else model, adapter.tokenizer)


def random_concept(d_model: int, eval_examples) -> ConceptFunction:
    """A projection on a fixed random direction at :data:`HOOK`, read at the last prompt token."""
    direction = ConceptDirection(torch.randn(d_model, generator=torch.Generator().manual_seed(0)), HOOK, kind="custom")
    return ConceptFunction.from_directions(direction, eval_examples=eval_examples)


def score_both(adapter, concept: ConceptFunction, examples, fisher: str = "empirical") -> dict:
    """EK-FAC fitted on ``examples`` (blocks 0..1), the Concept Influence scores with it and the fast path's scores,
    plus the estimator (for its preconditioned queries)."""
    curvature = fit_curvature(adapter, examples, maps=1, fisher=fisher, batch_size=8, progress=False)
    influence = ConceptInfluence(concept, curvature)
    return {"curvature": curvature, "estimator": influence,
            "influence": influence.score(adapter, examples, batch_size=8, progress=False).column(0),
            "fast": ProbeProjection(concept).score(adapter, examples, progress=False).column(0)}


def assert_accumulated_in_float32(adapter, result: dict) -> None:
    """Every factor, the preconditioned queries, and the scores are float32 or wider, and finite."""
    curvature, estimator = result["curvature"], result["estimator"]
    for name, f in curvature.factors.items():
        for field in ("q_a", "lambda_a", "q_s", "lambda_s", "eigenvalues"):
            t = getattr(f, field)
            assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()), (name, field, t.dtype)
    maps = estimator.tracked_maps(adapter)
    queries, _ = estimator.preconditioned_queries(adapter, curvature, maps, 8, False)
    assert {q.dtype for q in queries.values()} == {torch.float32}
    for key in ("influence", "fast"):
        assert result[key].dtype == np.float64 and np.isfinite(result[key]).all()


def assert_agrees(got: dict, ref: dict, dtype_name: str) -> dict:
    """Scores of the low-precision model within the tolerances of the float32 model's; returns the measurements."""
    measured = {"influence_relative_error": relative_error(got["influence"], ref["influence"]),
                "influence_spearman": spearman(got["influence"], ref["influence"]),
                "fast_relative_error": relative_error(got["fast"], ref["fast"]),
                "fast_spearman": spearman(got["fast"], ref["fast"])}
    assert measured["influence_relative_error"] <= INFLUENCE_TOLERANCE[dtype_name], measured
    assert measured["fast_relative_error"] <= FAST_TOLERANCE[dtype_name], measured
    assert min(measured["influence_spearman"], measured["fast_spearman"]) >= MIN_SPEARMAN, measured
    return measured
