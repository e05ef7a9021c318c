"""Partitions of maps (issue 27, item 3, first part): the curvature fitted one group of maps at a time, each group
with its own covariance pass, eigendecomposition and eigenvalue pass over the data, so that only one group's
covariances and eigenbases are on the device at once; each group's factors can be moved off the device (``offload``)
before the next is fitted.

A map's factors depend on its own inputs and output gradients only (the labels sampled for the true Fisher depend on
the model and the seed, not on which maps are tracked), so a partitioned fit equals the unpartitioned one up to float
rounding. The partitions come from a count, from lists of map names, or from a memory plan
(:class:`concept_influence.plan.Plan`, whose partitions fit a device).

With ``directory``, each partition's factors are written there map by map (:mod:`.stored`) as soon as it is fitted and
freed before the next, and the curvature returned reads them back one map at a time: neither the fit nor
preconditioning ever holds more than one partition's factors (:func:`save_partition`, :func:`stored_curvature`; a run
folder resumes with :func:`partition_done`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..data import TokenizedExample
from ..models import LinearMap, ModelAdapter
from . import registry
from .base import Curvature, CurvatureError
from .ekfac import EKFACCurvature
from .fit import Accumulate, CurvatureSettings, fit_curvature, resolve_maps
from .stored import StoredFactors, map_file, read_map_metadata, write_map

__all__ = ["split_maps", "fit_partitioned", "save_partition", "stored_curvature", "partition_done"]


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
    directory: str | Path | None = None,
    progress: bool = True,
    accumulate: Accumulate | None = None,
    **changes: Any,
) -> Curvature:
    """:func:`~concept_influence.curvature.fit_curvature` one partition of ``maps`` at a time (see
    :func:`split_maps`), each with its own passes over ``examples``; the factors merged into one curvature.
    ``offload`` (e.g. ``"cpu"``) moves each partition's factors there once fitted, so the device holds one
    partition's at a time (preconditioning then runs where the factors are, and returns to the query's device).
    ``directory``: each partition's factors written there per map and freed; the curvature returned streams them
    (see the module docstring). ``accumulate`` is passed to each partition's fit
    (:data:`~concept_influence.curvature.fit.Accumulate`: how each pass covers the data; the GPU check times and
    measures each pass through it)."""
    s = (settings or CurvatureSettings()).replace(**changes)
    maps = resolve_maps(adapter, maps)
    groups = split_maps(maps, partitions)
    if not registry.passes(s.strategy) or len(groups) == 1 and offload is None and directory is None:
        return fit_curvature(adapter, examples, maps, s, progress=progress,  # (no pass: nothing to partition)
                             accumulate=accumulate)
    factors, first = {}, None
    for group in groups:
        part = _eigenbasis(fit_curvature(adapter, examples, group, s, progress=progress, accumulate=accumulate))
        if directory is not None:
            save_partition(directory, part)
        else:
            first = first or (part.strategy, part.fisher, part.fingerprint, part.n_examples)  # (not the factors)
            for name, f in part.factors.items():
                factors[name] = f if offload is None else _moved(f, offload)
        del part  # (before the next partition is fitted)
    if directory is not None:
        return stored_curvature(directory, [m.name for m in maps], s)
    strategy, fisher, fingerprint, n_examples = first
    return EKFACCurvature({m.name: factors[m.name] for m in maps}, strategy, damping=s.damping,
                          damping_factor=s.damping_factor, fisher=fisher, fingerprint=fingerprint, n_examples=n_examples)


def _eigenbasis(part: Curvature) -> EKFACCurvature:
    if not isinstance(part, EKFACCurvature):
        raise CurvatureError(f"partitions merge EK-FAC and K-FAC factors; a {part.strategy} curvature has none")
    return part


def save_partition(directory: str | Path, part: Curvature, metadata: Mapping[str, str] | None = None) -> None:
    """Write a fitted partition's factors into ``directory/maps/``, one file per map, one map at a time; each file's
    header keeps the model's fingerprint, the number of examples and ``metadata``."""
    part = _eigenbasis(part)
    header = {"fingerprint": part.fingerprint or "", "n_examples": str(part.n_examples), **(metadata or {})}
    for name, basis in part.factors.items():
        write_map(directory, name, basis, part.saves_eigenvalues(part.strategy), header)


def partition_done(directory: str | Path, names: Sequence[str], metadata: Mapping[str, str]) -> bool:
    """Whether every map of ``names`` has its file in ``directory`` with ``metadata`` in its header (a partition
    written before a stop, from the same data)."""
    headers = [read_map_metadata(Path(directory) / map_file(n)) for n in names]
    return all(h is not None and all(h.get(k) == v for k, v in metadata.items()) for h in headers)


def stored_curvature(directory: str | Path, names: Sequence[str], settings: CurvatureSettings) -> EKFACCurvature:
    """The curvature of the maps ``names`` whose files :func:`save_partition` wrote in ``directory``, fitted as
    ``settings`` say, reading them one map at a time; its ``curvature.json`` is written (no factor is read: each
    entry comes from its file's header)."""
    directory, entries, headers = Path(directory), [], []
    for name in names:
        path = directory / map_file(name)
        header = read_map_metadata(path)
        if header is None or not {"shape", "eigenvalue_mean", "n_examples"} <= set(header):
            raise CurvatureError(f"{path}: missing, unreadable or not written by save_partition")
        d_out, d_in = (int(x) for x in header["shape"].split("x"))
        entries.append({"name": name, "shape": [d_out, d_in], "file": map_file(name),
                        "eigenvalue_mean": float(header["eigenvalue_mean"])})
        headers.append(header)
    s = settings
    stored = StoredFactors(directory, entries, EKFACCurvature.saves_eigenvalues(s.strategy))
    curvature = EKFACCurvature(stored, s.strategy, damping=s.damping, damping_factor=s.damping_factor, fisher=s.fisher,
                               fingerprint=headers[0]["fingerprint"] or None, n_examples=int(headers[0]["n_examples"]))
    curvature.save(directory)
    return curvature
