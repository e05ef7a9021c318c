"""EK-FAC refined by a few steps of preconditioned conjugate gradient (CG) on the damped Fisher of the fit data.

EK-FAC's damped inverse is a guess at ``(F + λI)⁻¹ v``: exact only where ``F`` is diagonal in its Kronecker eigenbasis.
:class:`RefinedCurvature` starts there, ``x_0 = P v`` with ``P`` the EK-FAC preconditioner, and takes ``steps`` steps
of CG on ``(F + λI) x = v`` preconditioned by ``P``, with ``F`` the matrix the EK-FAC fit estimates
(:class:`~concept_influence.curvature.gauss_newton.GaussNewton`: the exact true Fisher, or the outer products of the
fit's own sampled or data-label gradients) over the fit examples, and ``λ`` EK-FAC's own damping of each map. So
0 steps is EK-FAC exactly, and enough steps the exact damped inverse; each step costs one product with ``F``, a pass
over the fit data, for all K columns of a query at once (each column its own CG). The relative residual
``‖v − (F + λI) x‖ / ‖v‖`` of each column after each step is kept in ``last_residuals``.

It preconditions a query like any curvature (``ConceptInfluence(concept, curvature=refined)``) but holds the model and
the fit data, so it is not saved: save its EK-FAC and build it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..data import TokenizedExample
from ..models import LinearMap, ModelAdapter
from .base import Curvature, CurvatureError
from .ekfac import EKFACCurvature
from .fit import resolve_maps
from .gauss_newton import GaussNewton

__all__ = ["RefinedCurvature"]

Vectors = dict[str, torch.Tensor]


def _dot(a: Vectors, b: Vectors) -> torch.Tensor:
    """Per column ``[K]``: the inner product over every map."""
    return sum((a[name] * b[name]).flatten(1).sum(1) for name in a)


class RefinedCurvature(Curvature):
    """EK-FAC ``ekfac`` refined by ``steps`` steps of preconditioned CG on the damped Fisher of ``examples`` (the fit
    data; see the module docstring). ``labels`` picks the Fisher (:data:`~.gauss_newton.LABELS`; default ``"expected"``
    for a true-Fisher fit, ``"data"`` for an empirical one); ``seed`` is the fit's (``CurvatureSettings.seed``), for
    ``"sampled"``; ``maps`` as :func:`~concept_influence.curvature.resolve_maps` (default: the adapter's)."""

    strategies = {"ekfac_cg": None}  # built from a fitted EK-FAC, not fitted

    def __init__(self, ekfac: EKFACCurvature, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *,
                 steps: int = 5, labels: str | None = None, maps: None | int | Sequence[LinearMap] = None,
                 seed: int = 0, batch_size: int = 8, progress: bool = False) -> None:
        if not isinstance(ekfac, EKFACCurvature):
            raise TypeError(f"ekfac must be an EKFACCurvature, got {type(ekfac).__name__}")
        if steps < 0:
            raise ValueError(f"steps must be at least 0, got {steps}")
        super().__init__("ekfac_cg", ekfac.shapes, ekfac.fisher, ekfac.fingerprint, ekfac.n_examples)
        self.ekfac, self.steps = ekfac, int(steps)
        labels = labels or ("data" if ekfac.fisher == "empirical" else "expected")
        self.fisher_matrix = GaussNewton(adapter, examples, resolve_maps(adapter, maps), labels=labels, seed=seed,
                                         batch_size=batch_size, progress=progress)
        #: ``[steps + 1, K]``: each column's relative residual after 0, 1, … steps of the last preconditioning
        self.last_residuals: torch.Tensor | None = None

    def precondition(self, grads: Vectors) -> Vectors:
        """The query after ``steps`` CG steps (see :meth:`iterates`); same keys, shapes and dtype."""
        for x, _ in self.iterates(grads):
            pass
        return x

    def iterates(self, grads: Vectors) -> Iterator[tuple[Vectors, torch.Tensor]]:
        """Yield ``(x_i, residuals_i [K])`` for ``i = 0 … steps``: the query after ``i`` CG steps (``x_0`` is EK-FAC's)
        and each column's relative residual; leading dims of ``grads`` are the K columns. Sets ``last_residuals``."""
        x0 = self.ekfac.precondition(grads)  # also checks the maps and shapes
        columns = {name: v.reshape(-1, *v.shape[-2:]).double() for name, v in grads.items()}
        x = {name: v.reshape(-1, *v.shape[-2:]).double() for name, v in x0.items()}

        def formatted(y: Vectors) -> Vectors:
            return {name: y[name].reshape(grads[name].shape).to(grads[name]) for name in grads}

        norms = _dot(columns, columns).sqrt()
        scale = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        r = {name: v - ax for (name, v), ax in zip(columns.items(), self._damped(x).values())}
        history = [_dot(r, r).sqrt() * scale]
        self.last_residuals = torch.stack(history)
        yield x0, history[-1]
        z = self._preconditioned(r)
        p, rz = z, _dot(r, z)
        for step in range(self.steps):
            ap = self._damped(p)
            pap = _dot(p, ap)
            alpha = torch.where(pap > 0, rz / pap, torch.zeros_like(pap))
            for name in x:
                x[name] = x[name] + _per_column(alpha, p[name])
                r[name] = r[name] - _per_column(alpha, ap[name])
            history.append(_dot(r, r).sqrt() * scale)
            self.last_residuals = torch.stack(history)
            yield formatted(x), history[-1]
            if step + 1 < self.steps:
                z = self._preconditioned(r)
                rz_next = _dot(r, z)
                beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
                p = {name: z[name] + _per_column(beta, p[name]) for name in p}
                rz = rz_next

    def _damped(self, x: Vectors) -> Vectors:
        """``(F + λI) x`` with each map's EK-FAC damping."""
        fx = self.fisher_matrix(x)
        return {name: fx[name] + self.ekfac.dampings[name] * x[name] for name in x}

    def _preconditioned(self, r: Vectors) -> Vectors:
        return {name: v.double() for name, v in self.ekfac.precondition(r).items()}

    def save(self, directory: str | Path) -> Path:
        raise CurvatureError("a CG-refined curvature holds the model and its fit data and is not saved: save its EK-FAC "
                             "(refined.ekfac.save(...)) and build RefinedCurvature from it again")


def _per_column(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``weights[k] * v[k]`` for ``v`` ``[K, d_out, d_in]``."""
    return weights[:, None, None] * v
