"""EK-FAC and K-FAC curvature: per map a Kronecker eigenbasis with eigenvalues ``Λ`` (corrected for
EK-FAC, ``outer(λ_S, λ_A)`` for K-FAC), preconditioning with ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ``.

Damping: ``damping=None`` (default) uses ``λ = damping_factor × mean(Λ)`` per map, ``damping_factor=0.1``
as in Grosse et al. (2023); a float ``damping`` is one absolute ``λ`` for every map.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import CurvatureError
from .core import KroneckerEigen
from .eigenbasis import EigenbasisCurvature

__all__ = ["EKFACCurvature", "DEFAULT_DAMPING_FACTOR"]

DEFAULT_DAMPING_FACTOR = 0.1


def check_damping(damping: float | None, damping_factor: float) -> None:
    """Raise ``ValueError`` naming the argument unless ``damping`` is None or > 0 and ``damping_factor`` > 0."""
    if damping is not None and not float(damping) > 0:
        raise ValueError(f"damping must be a positive absolute value or None (relative), got {damping!r}")
    if not float(damping_factor) > 0:
        raise ValueError(f"damping_factor must be positive, got {damping_factor!r}")


class EKFACCurvature(EigenbasisCurvature):
    """EK-FAC (``strategy="ekfac"``) or K-FAC (``strategy="kfac"``) factors for a set of maps."""

    strategies = {"ekfac": ("covariance", "eigenvalues"), "kfac": ("covariance",)}
    has_damping = True

    @classmethod
    def fit(cls, strategy: str, fitting) -> "EKFACCurvature":
        factors, n_examples = fitting.kronecker_factors()
        if strategy == "ekfac":
            factors = fitting.corrected(factors)
        s = fitting.settings
        return cls(factors, strategy, damping=s.damping, damping_factor=s.damping_factor, fisher=s.fisher,
                   fingerprint=fitting.fingerprint, n_examples=n_examples)

    def __init__(
        self,
        factors: Mapping[str, KroneckerEigen],
        strategy: str = "ekfac",
        *,
        damping: float | None = None,
        damping_factor: float = DEFAULT_DAMPING_FACTOR,
        fisher: str | None = "true",
        fingerprint: str | None = None,
        n_examples: int = 0,
    ) -> None:
        if strategy not in self.strategies:
            raise ValueError(f"strategy must be one of {', '.join(self.strategies)}, got {strategy!r}")
        check_damping(damping, damping_factor)
        super().__init__(strategy, factors, fisher, fingerprint, n_examples)
        self.damping = None if damping is None else float(damping)
        self.damping_factor = float(damping_factor)
        self.dampings = {
            name: self.damping if damping is not None else self.damping_factor * self.eigenvalue_mean(name)
            for name in self.shapes
        }

    def with_damping(self, damping: float | None = None, damping_factor: float = DEFAULT_DAMPING_FACTOR) -> "EKFACCurvature":
        """The same factors with another damping (see the module docstring)."""
        return EKFACCurvature(
            self.factors, self.strategy, damping=damping, damping_factor=damping_factor,
            fisher=self.fisher, fingerprint=self.fingerprint, n_examples=self.n_examples,
        )

    def eigen_weights(self, name: str, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (sigma + self.dampings[name])

    def _precondition_map(self, name: str, v: torch.Tensor) -> torch.Tensor:
        damping = self.dampings[name]
        if not damping > 0:
            if not v.any():  # (G + λI)⁻¹ 0 = 0 for every λ, e.g. lora_A while lora_B is still 0
                return torch.zeros_like(v)
            raise CurvatureError(f"map {name!r} has zero curvature, so its relative damping is zero; pass an absolute damping")
        f = self.factors[name]
        return f.precondition(v.to(f.q_a), damping).to(v)

    def _config(self) -> dict:
        return {"damping": self.damping, "damping_factor": self.damping_factor}

    @classmethod
    def saves_eigenvalues(cls, strategy: str) -> bool:
        """EK-FAC's eigenvalues are corrected; K-FAC's are the basis's own ``outer(λ_S, λ_A)``."""
        return strategy == "ekfac"

    @classmethod
    def _restore(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "EKFACCurvature":
        return cls(
            cls._restore_factors(config, tensors), config["strategy"], damping=config["damping"],
            damping_factor=config["damping_factor"], fisher=config["fisher"], fingerprint=config["fingerprint"],
            n_examples=config["n_examples"],
        )
