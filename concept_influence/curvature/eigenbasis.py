"""Curvatures that hold a Kronecker eigenbasis per map: EK-FAC and K-FAC (:mod:`.ekfac`) and unrolled preconditioning
(:mod:`.unrolled`) both build on :class:`EigenbasisCurvature`, which keeps the factors and saves and reads them back.

A saved eigenbasis is each map's ``<name>/q_a``, ``lambda_a``, ``q_s`` and ``lambda_s`` and, where the eigenvalues
are corrected (EK-FAC, unrolled), ``<name>/eigenvalues``; K-FAC's are ``outer(λ_S, λ_A)``, computed again on loading.
Saved per map (:mod:`.stored`), each map's file holds the same tensors without the ``<name>/`` prefix, and the loaded
curvature reads them one map at a time when it preconditions (``factors`` is then a :class:`~.stored.StoredFactors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .base import MAPS_FORMAT_VERSION, Curvature, CurvatureError, map_shapes
from .core import KroneckerEigen
from .stored import BASIS_TENSORS, STORAGE, StoredFactors, basis_from_tensors, write_map

__all__ = ["EigenbasisCurvature"]


class EigenbasisCurvature(Curvature):
    """A curvature with a :class:`~concept_influence.curvature.core.KroneckerEigen` per map (``factors``) that
    preconditions by a weight per eigen-direction (``eigen_weights``); registers no strategy of its own."""

    has_eigenbasis = True

    def __init__(self, strategy: str, factors: Mapping[str, KroneckerEigen], fisher: str | None,
                 fingerprint: str | None, n_examples: int) -> None:
        if isinstance(factors, StoredFactors):  # (kept as it is: each map is read when used)
            shapes = factors.shapes
        else:
            factors = dict(factors)
            shapes = {name: (f.q_s.shape[0], f.q_a.shape[0]) for name, f in factors.items()}
        super().__init__(strategy, shapes, fisher, fingerprint, n_examples)
        self.factors = factors

    @property
    def streams(self) -> bool:
        """Whether the factors are read from files per map at each use (:meth:`Curvature.load` of such a folder)."""
        return isinstance(self.factors, StoredFactors)

    def eigenvalue_mean(self, name: str) -> float:
        """The mean eigenvalue of map ``name`` (read from the folder's JSON when the factors are streamed)."""
        if isinstance(self.factors, StoredFactors):
            return self.factors.eigenvalue_mean(name)
        return float(self.factors[name].eigenvalues.mean())

    @classmethod
    def saves_eigenvalues(cls, strategy: str) -> bool:
        """Whether a curvature of ``strategy`` saves its eigenvalues (they are corrected, not the basis's own)."""
        return True

    def _tensors(self) -> dict[str, torch.Tensor]:
        keys = BASIS_TENSORS + (("eigenvalues",) if self.saves_eigenvalues(self.strategy) else ())
        return {f"{name}/{k}": getattr(f, k) for name, f in self.factors.items() for k in keys}

    def _write(self, directory: Path, per_map: bool | None) -> dict:
        if not (self.streams if per_map is None else per_map):
            return super()._write(directory, per_map)
        if self.streams and self.factors.directory.resolve() == directory.resolve():
            entries = self.factors.entries  # (already there)
        else:
            with_eigenvalues = self.saves_eigenvalues(self.strategy)
            entries = [write_map(directory, name, f, with_eigenvalues) for name, f in self.factors.items()]
        return {"format_version": MAPS_FORMAT_VERSION, "storage": STORAGE, "maps": entries}

    @classmethod
    def _read(cls, directory: Path, config: dict, device: str) -> "Curvature":
        if config.get("storage") is None and config.get("format_version") != MAPS_FORMAT_VERSION:
            return super()._read(directory, config, device)
        if config.get("storage") != STORAGE or config.get("format_version") != MAPS_FORMAT_VERSION:
            raise CurvatureError(f"{directory / 'curvature.json'}: storage {config.get('storage')!r} at format version "
                                 f"{config.get('format_version')}; expected {STORAGE!r} at version {MAPS_FORMAT_VERSION}")
        return cls._restore(config, StoredFactors(directory, config["maps"], cls.saves_eigenvalues(config["strategy"]),
                                                  device))

    @classmethod
    def _restore_factors(cls, config: dict, tensors: Mapping[str, torch.Tensor] | StoredFactors
                         ) -> Mapping[str, KroneckerEigen]:
        """Each map's eigenbasis from the saved ``tensors``, every tensor checked against the map's shape in ``config``
        (a :class:`StoredFactors` as it is: its files are checked as each is read)."""
        if isinstance(tensors, StoredFactors):
            return tensors
        with_eigenvalues = cls.saves_eigenvalues(config["strategy"])
        return {name: basis_from_tensors(tensors, name, shape, with_eigenvalues, f"{name}/", "saved curvature")
                for name, shape in map_shapes(config).items()}
