"""Curvatures that hold a Kronecker eigenbasis per map: EK-FAC and K-FAC (:mod:`.ekfac`) and unrolled preconditioning
(:mod:`.unrolled`) both build on :class:`EigenbasisCurvature`, which keeps the factors and saves and reads them back.

A saved eigenbasis is each map's ``<name>/q_a``, ``lambda_a``, ``q_s`` and ``lambda_s`` and, where the eigenvalues
are corrected (EK-FAC, unrolled), ``<name>/eigenvalues``; K-FAC's are ``outer(λ_S, λ_A)``, computed again on loading.
"""

from __future__ import annotations

import torch

from .base import Curvature, CurvatureError, map_shapes
from .core import KroneckerEigen

__all__ = ["EigenbasisCurvature"]

_BASIS_TENSORS = ("q_a", "lambda_a", "q_s", "lambda_s")


class EigenbasisCurvature(Curvature):
    """A curvature with a :class:`~concept_influence.curvature.core.KroneckerEigen` per map (``factors``) that
    preconditions by a weight per eigen-direction (``eigen_weights``); registers no strategy of its own."""

    has_eigenbasis = True

    def __init__(self, strategy: str, factors: dict[str, KroneckerEigen], fisher: str | None, fingerprint: str | None,
                 n_examples: int) -> None:
        shapes = {name: (f.q_s.shape[0], f.q_a.shape[0]) for name, f in factors.items()}
        super().__init__(strategy, shapes, fisher, fingerprint, n_examples)
        self.factors = dict(factors)

    @classmethod
    def saves_eigenvalues(cls, strategy: str) -> bool:
        """Whether a curvature of ``strategy`` saves its eigenvalues (they are corrected, not the basis's own)."""
        return True

    def _tensors(self) -> dict[str, torch.Tensor]:
        keys = _BASIS_TENSORS + (("eigenvalues",) if self.saves_eigenvalues(self.strategy) else ())
        return {f"{name}/{k}": getattr(f, k) for name, f in self.factors.items() for k in keys}

    @classmethod
    def _restore_factors(cls, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, KroneckerEigen]:
        """Each map's eigenbasis from the saved ``tensors``, every tensor checked against the map's shape in ``config``."""
        factors = {}
        for name, (d_out, d_in) in map_shapes(config).items():
            expected = {"q_a": (d_in, d_in), "lambda_a": (d_in,), "q_s": (d_out, d_out), "lambda_s": (d_out,)}
            if cls.saves_eigenvalues(config["strategy"]):
                expected["eigenvalues"] = (d_out, d_in)
            for k, shape in expected.items():
                t = tensors.get(f"{name}/{k}")
                if t is None or tuple(t.shape) != shape:
                    found = "missing" if t is None else f"shape {tuple(t.shape)}"
                    raise CurvatureError(f"saved curvature: tensor {name}/{k} is {found}, expected shape {shape}")
            basis = KroneckerEigen.from_eigen(*(tensors[f"{name}/{k}"] for k in _BASIS_TENSORS))
            factors[name] = basis.with_eigenvalues(tensors[f"{name}/eigenvalues"]) if "eigenvalues" in expected else basis
        return factors
