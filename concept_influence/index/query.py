"""Querying a gradient index: the query gradient on the evaluation texts (or test examples) only, projected and
preconditioned in each map's space, then one matrix product with every stored row, streamed over the shards, summed
over the index's checkpoints.

A query is a gradient estimator (:class:`~concept_influence.estimators.ConceptInfluence`, ``ConceptGradDot``,
``InfluenceFunction``, ``GradDot``): its measurement gives the query gradients and its name and sign the scores', so
the result is the :class:`~concept_influence.scores.Scores` its own ``score`` would give, up to the compression.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..curvature import Curvature
from ..curvature.ekfac import DEFAULT_DAMPING_FACTOR
from ..estimators import GradientEstimator
from ..fileio import load_tensors_and_metadata, save_tensors
from ..models import LinearMap, ModelAdapter
from ..provenance import combine_digests
from ..scores import Scores
from .store import GradientIndexError, IndexStore
from .subspace import QUERY_CURVATURES, MapSpace, cholesky, damped

__all__ = ["index_scores", "query_mode", "checkpoint_query", "query_matrix", "projected_measurement", "stream_scores",
           "empirical_moments"]


def empirical_moments(store: IndexStore, c: int, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Each map's second moment of the stored rows of checkpoint ``c``, ``mean_z r_z r_zᵀ`` ``[D, D]`` (float64; the
    row scale divided out): the curvature fitted in the projected space, as LoGra and Bergson fit it. Computed in one
    pass over the shards and kept in ``empirical.safetensors`` for the next query."""
    path = store.checkpoint_dir(c) / "empirical.safetensors"
    digest = combine_digests(store.manifest["checkpoints"][c]["digests"])
    if path.is_file():
        tensors, meta = load_tensors_and_metadata(path, GradientIndexError)
        if meta.get("data") == digest:
            return tensors
    spaces = store.load_spaces(c)
    sums = {s.name: torch.zeros(s.dim, s.dim, dtype=torch.float64) for s in spaces}
    n = 0
    for _, block in store.iter_rows(c, store.dim, chunk):
        n += len(block)
        for s, e in zip(spaces, store.manifest["maps"]):
            x = block[:, e["offset"]:e["offset"] + e["dim"]] / s.scale
            sums[s.name] += (x.T @ x).double()
    moments = {name: total / max(n, 1) for name, total in sums.items()}
    save_tensors(path, moments, {"data": digest})
    return moments


def _used_maps(store: IndexStore, estimator: GradientEstimator, adapter: ModelAdapter):
    """The index's maps the query needs, in index order; a concept that needs a map the index lacks is refused (its
    scores would silently lose that map's share); a test-loss query uses the maps the index holds."""
    held = {e["name"] for e in store.manifest["maps"]}
    needed = estimator.tracked_maps(adapter)
    missing = [m.name for m in needed if m.name not in held]
    concept = getattr(estimator, "concept", None)
    if missing and concept is not None:
        blocks = sorted({e["block"] for e in store.manifest["maps"]})
        raise GradientIndexError(f"{store.path}: the concept at {concept.hook_name} needs the maps of blocks 0..{concept.layer}, "
                                 f"the index holds blocks {blocks[0]}..{blocks[-1]} (first missing: {missing[0]}); build "
                                 "an index whose run's probe is at that block or later")
    names = {m.name for m in needed}
    return [m for m in adapter.linear_maps() if m.name in names and m.name in held]


def query_matrix(store: IndexStore, c: int, spaces: Sequence[MapSpace], grads: dict[str, torch.Tensor], mode: str,
             damping_factor: float) -> torch.Tensor:
    """The query matrix ``[columns, K]`` of the projected query gradients ``grads`` (``[K, r_out, r_in]`` per map, as
    :func:`projected_measurement` gives them) in checkpoint ``c``'s ``spaces`` (``mode``: a curvature of
    :data:`QUERY_CURVATURES`), over a row's first columns up to the last map queried."""
    layout = {e["name"]: e for e in store.manifest["maps"]}
    full = Curvature.load(store.checkpoint_dir(c) / "curvature") if store.manifest["settings"]["projection"] == "identity" \
        and mode == "ekfac" else None
    moments = empirical_moments(store, c) if mode == "empirical" else {}
    columns = max(layout[name]["offset"] + layout[name]["dim"] for name in grads)
    k = next(iter(grads.values())).shape[0]
    q = torch.zeros(columns, k)
    for s in spaces:
        if s.name in grads:
            e = layout[s.name]
            chol = cholesky(damped(moments[s.name], damping_factor), f"map {s.name}") if mode == "empirical" else None
            q[e["offset"]:e["offset"] + e["dim"]] = s.query(grads[s.name], mode, full, chol).T
    return q


def projected_measurement(estimator: GradientEstimator, adapter: ModelAdapter, maps: Sequence[LinearMap],
                          spaces: Sequence[MapSpace], batch_size: int = 8, progress: bool = False
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The estimator's query gradients at ``maps``, each projected into its space ``[K, r_out, r_in]`` from the
    tokens (never at full size unless the space is unprojected), and the column names."""
    projections = {s.name: s.projection for s in spaces}
    return estimator.measurement(adapter, maps, batch_size, progress, projections)


def stream_scores(store: IndexStore, c: int, q: torch.Tensor, chunk: int = 1024) -> tuple[list[str], np.ndarray]:
    """Every stored row of checkpoint ``c`` (its first ``len(q)`` columns) times the query matrix ``q`` ``[columns, K]``:
    the ids and ``[N, K]`` values, streamed over the shards."""
    ids, parts = [], []
    for block_ids, block in store.iter_rows(c, q.shape[0], chunk):
        parts.append((block @ q).double().numpy())
        ids += block_ids
    return ids, np.concatenate(parts) if parts else np.zeros((0, q.shape[1]))


def query_mode(estimator: GradientEstimator, curvature: str) -> str:
    """The curvature a query of ``estimator`` uses in the projected space: ``curvature`` (one of
    :data:`QUERY_CURVATURES`, checked), or ``identity`` whenever the estimator's own curvature is the identity."""
    if curvature not in QUERY_CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; expected one of {', '.join(QUERY_CURVATURES)}")
    return "identity" if estimator.curvature == "identity" else curvature


def checkpoint_query(store: IndexStore, c: int, estimator: GradientEstimator, adapter: ModelAdapter, mode: str,
                     damping_factor: float = DEFAULT_DAMPING_FACTOR, batch_size: int = 8, progress: bool = False
                     ) -> tuple[torch.Tensor, list[str], list[LinearMap]]:
    """The query matrix ``[columns, K]`` of ``estimator`` at checkpoint ``c`` (``adapter``: the model there, checked by
    fingerprint; ``mode`` from :func:`query_mode`), its column names and the maps it reads: a stored row of that
    checkpoint (or anything in its space, such as an encoder's reconstruction) times it is the estimator's score."""
    entry = store.manifest["checkpoints"][c]
    if adapter.fingerprint() != entry["fingerprint"]:
        raise GradientIndexError(f"{store.path}: checkpoint {c} ({entry['source']}) was indexed on model "
                                 f"{entry['fingerprint']}, this model's fingerprint is {adapter.fingerprint()}; "
                                 "query with the model the index was built on")
    used = _used_maps(store, estimator, adapter)
    spaces = store.load_spaces(c)
    grads, columns = projected_measurement(estimator, adapter, used, spaces, batch_size, progress)
    return query_matrix(store, c, spaces, grads, mode, damping_factor), columns, used


def index_scores(store: IndexStore, estimator: GradientEstimator, adapters: Sequence[ModelAdapter], *,
                 curvature: str = "ekfac", damping_factor: float = DEFAULT_DAMPING_FACTOR, batch_size: int = 8,
                 progress: bool = True, chunk: int = 1024) -> Scores:
    """The estimator's scores of every indexed example, summed over the index's checkpoints (each with its weight):
    ``adapters[c]`` is the model at checkpoint ``c`` (checked by fingerprint). ``curvature``: the curvature the index
    was built with (EK-FAC, or any method with an eigenbasis, e.g. unrolled) restricted to each map's space
    (``ekfac``), the damped second moment of the stored rows (``empirical``, damping ``damping_factor`` × mean
    eigenvalue), or none (``identity``; also whenever the estimator's curvature is the identity, e.g.
    ``ConceptGradDot``)."""
    mode = query_mode(estimator, curvature)
    checkpoints = store.manifest["checkpoints"]
    unfinished = [c for c, entry in enumerate(checkpoints) if not entry.get("finished")]
    if not checkpoints or unfinished:
        raise GradientIndexError(f"{store.path}: the index has no finished checkpoint" if not checkpoints else
                                 f"{store.path}: checkpoint {unfinished[0]} is not finished; run `concept-influence index "
                                 "build` again to finish it")
    if len(adapters) != len(checkpoints):
        raise GradientIndexError(f"{store.path}: the index has {len(checkpoints)} checkpoints, {len(adapters)} models given")
    for c, entry in enumerate(checkpoints):  # every shard readable before any gradient is computed
        for index in range(entry["n_shards"]):
            store.rows(c, index)
    total, ids, columns, used = None, None, None, []
    for c, (entry, adapter) in enumerate(zip(checkpoints, adapters)):
        if entry["digests"] != checkpoints[0]["digests"]:
            raise GradientIndexError(f"{store.path}: checkpoint {c} indexes other data than checkpoint 0")
        q, columns, used = checkpoint_query(store, c, estimator, adapter, mode, damping_factor, batch_size, progress)
        part_ids, values = stream_scores(store, c, q, chunk)
        values = entry["weight"] * values
        total, ids = (values, part_ids) if total is None else (total + values, ids)
    name = estimator.name + ("[checkpoints]" if len(checkpoints) > 1 else "")
    s = store.manifest["settings"]
    metadata = {"index": str(store.path.resolve()), "projection": s["projection"], "rank": store.manifest["rank"],
                "dtype": s["dtype"], "curvature": mode, "maps": [m.name for m in used], "n_skipped": checkpoints[0]["n_skipped"],
                "checkpoints": [e["source"] for e in checkpoints], "checkpoint_weights": [e["weight"] for e in checkpoints]}
    return Scores(ids, -total, name, columns, metadata)
