"""Partitions of maps (issue 27, item 3, first part): the curvature fitted one group of maps at a time, each group
with its own covariance pass, eigendecomposition and eigenvalue pass over the data, so that only one group's
covariances and eigenbases are on the device at once; each group's factors can be moved off the device (``offload``)
before the next is fitted.

A map's factors depend on its own inputs and output gradients only (the labels sampled for the true Fisher depend on
the model and the seed, not on which maps are tracked), so a partitioned fit equals the unpartitioned one up to float
rounding. The partitions come from a count, from lists of map names, or from a memory plan
(:class:`concept_influence.plan.Plan`, whose partitions fit a device).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..data import TokenizedExample
from ..models import LinearMap, ModelAdapter
from . import registry
from .base import Curvature, CurvatureError
from .ekfac import EKFACCurvature
from .fit import CurvatureSettings, fit_curvature, resolve_maps

__all__ = ["split_maps", "fit_partitioned"]


def split_maps(maps: Sequence[LinearMap], partitions) -> list[list[LinearMap]]:
    """``maps`` in groups, in order: ``partitions`` is a count (that many groups of consecutive maps, cut where the
    covariance size passes each 1/count of the total; at most one group per map), lists of map names (every map in
    exactly one), or a :class:`~concept_influence.plan.Plan` (its partitions, rank after rank)."""
    maps = list(maps)
    by_name = {m.name: m for m in maps}
    if hasattr(partitions, "partitions") and hasattr(partitions, "settings"):  # a Plan
        partitions = [names for parts in partitions.partitions for names in parts]
    if isinstance(partitions, bool) or not isinstance(partitions, (int, list, tuple)):
        raise CurvatureError(f"partitions must be a count, lists of map names or a Plan; got {type(partitions).__name__}")
    if isinstance(partitions, int):
        if partitions < 1:
            raise CurvatureError(f"partitions must be >= 1, got {partitions}")
        n = min(partitions, len(maps))
        cum = [0]
        for m in maps:
            cum.append(cum[-1] + m.shape[0] ** 2 + m.shape[1] ** 2)
        cuts = [0]
        for k in range(1, n):  # the first cut at or past k/n of the covariance size, leaving a map for each group
            j = cuts[-1] + 1
            while j < len(maps) - (n - k) and cum[j] < cum[-1] * k / n:
                j += 1
            cuts.append(j)
        cuts.append(len(maps))
        return [maps[a:b] for a, b in zip(cuts, cuts[1:])]
    groups = [[by_name.get(n, n) for n in names] for names in partitions]
    unknown = [n for g in groups for n in g if isinstance(n, str)]
    if unknown:
        raise CurvatureError(f"partitions name {unknown[0]!r}, which is not among the tracked maps "
                             f"({', '.join(list(by_name)[:3])}, ...)")
    named = [m.name for g in groups for m in g]
    if sorted(named) != sorted(by_name):
        twice = next((n for n in named if named.count(n) > 1), None)
        missing = next((n for n in by_name if n not in named), None)
        raise CurvatureError(f"partitions must hold every tracked map once: {twice!r} is in two" if twice else
                             f"partitions must hold every tracked map once: {missing!r} is in none")
    return [g for g in groups if g]


def _moved(factors, device: str | torch.device):
    return type(factors)(**{f.name: getattr(factors, f.name).to(device) for f in dataclasses.fields(factors)})


def fit_partitioned(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    maps: None | int | Sequence[LinearMap] | Any = None,
    partitions: Any = 1,
    settings: CurvatureSettings | None = None,
    *,
    offload: str | torch.device | None = None,
    progress: bool = True,
    **changes: Any,
) -> Curvature:
    """:func:`~concept_influence.curvature.fit_curvature` one partition of ``maps`` at a time (see
    :func:`split_maps`), each with its own passes over ``examples``; the factors merged into one curvature.
    ``offload`` (e.g. ``"cpu"``) moves each partition's factors there once fitted, so the device holds one
    partition's at a time (preconditioning then runs where the factors are, and returns to the query's device)."""
    s = (settings or CurvatureSettings()).replace(**changes)
    maps = resolve_maps(adapter, maps)
    groups = split_maps(maps, partitions)
    if not registry.passes(s.strategy) or len(groups) == 1 and offload is None:  # (no pass: nothing to partition)
        return fit_curvature(adapter, examples, maps, s, progress=progress)
    factors, first = {}, None
    for group in groups:
        part = fit_curvature(adapter, examples, group, s, progress=progress)
        if not isinstance(part, EKFACCurvature):
            raise CurvatureError(f"partitions merge EK-FAC and K-FAC factors; a {s.strategy} curvature has none")
        first = first or part
        for name, f in part.factors.items():
            factors[name] = f if offload is None else _moved(f, offload)
        del part
    return EKFACCurvature({m.name: factors[m.name] for m in maps}, first.strategy, damping=s.damping,
                          damping_factor=s.damping_factor, fisher=first.fisher, fingerprint=first.fingerprint,
                          n_examples=first.n_examples)
