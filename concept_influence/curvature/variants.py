"""The variants of a curvature that the stability check (:mod:`concept_influence.stability`) scores beside it: the same
factors at damping × 0.01, × 0.1, × 10 and × 100 (a curvature with a damping, ``has_damping``: EK-FAC, K-FAC), or at
horizon ÷ 10 and × 10 (unrolled), and identity curvature, the plain gradient dot product (for every curvature but
identity itself).

A ranking that moves when the damping moves by a factor of ten depends on a choice nothing in the data fixed. Each
variant is a :class:`Curvature` of its own, so a gradient estimator preconditions its query once per variant and
scores every variant as extra query columns in its one pass over the data
(:class:`~concept_influence.estimators.GradientEstimator` with ``variants=True``).
"""

from __future__ import annotations

from typing import Callable

from . import registry
from .base import Curvature
from .identity import IdentityCurvature
from .unrolled import UnrolledCurvature

__all__ = ["DAMPING_VARIANTS", "HORIZON_VARIANTS", "stability_variants", "variant_kinds"]

#: The damping multipliers compared with the chosen damping.
DAMPING_VARIANTS = (0.01, 0.1, 10.0, 100.0)
#: The horizon multipliers compared with the chosen horizon.
HORIZON_VARIANTS = (0.1, 10.0)


def _damped(curvature, factor: float) -> Curvature:
    """The same factors with every map's damping times ``factor`` (absolute or relative, as the curvature has it)."""
    damping = None if curvature.damping is None else curvature.damping * factor
    return curvature.with_damping(damping, curvature.damping_factor * factor)


def _variants(cls: type | None) -> list[tuple[str, str, Callable[[Curvature], Curvature]]]:
    """``(name, kind, make)`` of each variant of a curvature of class ``cls``, in the order they are scored."""
    if cls is None:
        return []
    if cls.has_damping:
        out = [(f"damping x{f:g}", "damping", lambda c, f=f: _damped(c, f)) for f in DAMPING_VARIANTS]
    elif issubclass(cls, UnrolledCurvature):
        out = [(f"horizon x{f:g}", "horizon", lambda c, f=f: c.with_horizon(scale=f)) for f in HORIZON_VARIANTS]
    else:
        out = []
    if not issubclass(cls, IdentityCurvature):
        out.append(("identity", "identity", lambda c: IdentityCurvature(c.shapes, c.fingerprint, c.n_examples)))
    return out


def variant_kinds(curvature: Curvature | str) -> dict[str, str]:
    """``{name: kind}`` of the variants :func:`stability_variants` gives a curvature, or one of strategy ``curvature``
    (none for an unknown strategy): ``damping x0.01`` … ``damping x100`` (kind ``damping``) or ``horizon x0.1`` and
    ``horizon x10`` (``horizon``), then ``identity``."""
    cls = registry.method(curvature) if isinstance(curvature, str) else type(curvature)
    return {name: kind for name, kind, _ in _variants(cls)}


def stability_variants(curvature: Curvature) -> dict[str, Curvature]:
    """``{name: curvature}``: the variants of ``curvature``, named as :func:`variant_kinds` says (each shares its
    factors, so none costs memory beyond its own small fields)."""
    return {name: make(curvature) for name, _, make in _variants(type(curvature))}
