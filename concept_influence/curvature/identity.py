"""Identity curvature: ``G = I`` and no damping, so preconditioning is a no-op and scores are plain
gradient dot products (the first-order, "grad-dot" estimators)."""

from __future__ import annotations

import torch

from .base import Curvature, map_shapes

__all__ = ["IdentityCurvature"]


class IdentityCurvature(Curvature):
    """``precondition`` returns each gradient unchanged (no damping: not ``(I + λI)⁻¹`` but ``I``)."""

    strategies = {"identity": ()}

    @classmethod
    def fit(cls, strategy: str, fitting) -> "IdentityCurvature":
        return cls({m.name: m.shape for m in fitting.maps}, fitting.fingerprint, len(fitting.examples))

    def __init__(self, shapes: dict[str, tuple[int, int]], fingerprint: str | None = None, n_examples: int = 0) -> None:
        super().__init__("identity", shapes, fisher=None, fingerprint=fingerprint, n_examples=n_examples)

    def _precondition_map(self, name: str, v: torch.Tensor) -> torch.Tensor:
        return v

    @classmethod
    def _restore(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "IdentityCurvature":
        return cls(map_shapes(config), config["fingerprint"], config["n_examples"])
