"""Estimators: one interface, ``Estimator.score(adapter, examples) -> Scores``, and one registry of their names."""

from .base import Estimator
from .baselines import LengthBaseline, RandomBaseline, TfidfBaseline
from .fast_path import ProbeProjection, ProjectionDifference
from .gradient import ConceptGradDot, ConceptInfluence, GradDot, GradientEstimator, InfluenceFunction
from .over_checkpoints import OverCheckpoints
from .unrolled import SourceInfluence

ESTIMATORS = {
    cls.name: cls
    for cls in (ConceptInfluence, ConceptGradDot, InfluenceFunction, GradDot, ProbeProjection, ProjectionDifference,
                TfidfBaseline, LengthBaseline, RandomBaseline)
}
#: The estimators a run config can name (``scoring.estimator``): those that say what a run passes them.
RUN_ESTIMATORS = tuple(name for name, cls in ESTIMATORS.items() if cls.run_inputs is not None)

__all__ = ["ESTIMATORS", "RUN_ESTIMATORS", "Estimator", "GradientEstimator", "ConceptInfluence", "ConceptGradDot",
           "InfluenceFunction", "GradDot", "ProbeProjection", "ProjectionDifference", "TfidfBaseline", "LengthBaseline",
           "RandomBaseline", "OverCheckpoints", "SourceInfluence"]
