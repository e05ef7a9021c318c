"""Owner ranks (issue 27, item 4): under ``torchrun`` a run folder's tracked maps are dealt to the ranks by the cost of
their eigendecomposition (n³ of each side, the costliest first to the least loaded rank: :func:`~..plan.deal`, as the
memory plan deals them), and each rank fits the factors of the maps it owns.

Per partition of maps (``[factors] partitions``; one partition of every map when there are none): every rank sums the
covariances of its own shards of the data for every map of the partition, as before; then each map's sums go to its
owner only (:meth:`~..distributed.Ranks.reduce_to_owners`), and the owner eigendecomposes its maps. For EK-FAC the
owners write the eigenbases to ``factors/partial/`` and every rank reads the partition's bases for the eigenvalue pass,
whose sums go to the owners too. Each owner writes its maps' files in ``factors/maps/`` (the factors per map of
:mod:`~..curvature.stored`) and every rank scores by streaming them. The factors equal a single process's up to float
rounding (the sums are the same sums in another order).

What falls with the world size is what a rank owns: its maps' summed covariances, eigenbases and corrected
eigenvalues (1/N of the bytes, up to the dealing's imbalance), and the eigendecompositions it computes. What does not:
the sums of a pass over a rank's own shards cover every map of the partition, and the eigenvalue pass reads every map's
eigenbasis of the partition (the activations are not sent to the owners). Run.json's factors stage records both per
rank (``owners``). Resuming keeps the per-rank checkpoints of each pass; the summed statistics are kept per owner
(``statistics/<pass>-rank<r>of<N>.safetensors``), so a run resumed at another world size sums its passes again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..curvature import EKFACCurvature, collect_covariance_stats, collect_eigenvalue_stats
from ..curvature.core import KroneckerEigen
from ..curvature.fit import covariance_torch_dtype
from ..curvature.partitions import partition_done, save_partition, stored_curvature
from ..curvature.stored import BASIS_TENSORS, basis_from_tensors, map_file
from ..fileio import load_tensors_and_metadata, save_tensors
from ..models import LinearMap
from ..plan import deal
from ..provenance import combine_digests
from .checkpoints import Point
from .folder import RunError, write_or_explain

__all__ = ["owner_ranks", "uses_owners", "fit_owned"]


def owner_ranks(maps: Sequence[LinearMap], world_size: int) -> dict[str, int]:
    """``{map name: rank}``: the maps dealt by eigendecomposition cost (``d_out³ + d_in³``)."""
    dealt = deal([m.shape[0] ** 3 + m.shape[1] ** 3 for m in maps], world_size)
    return {maps[i].name: rank for rank, idx in enumerate(dealt) for i in idx}


def uses_owners(pipeline) -> bool:
    """Whether the run fits its factors on owner ranks: several ranks and a Kronecker-factored strategy."""
    return pipeline.ranks.world_size > 1 and pipeline.cfg.factors.strategy in EKFACCurvature.strategies


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _basis_path(final: Path, name: str) -> Path:
    return final / "partial" / ("basis-" + map_file(name).split("/", 1)[1])


def _read_basis(path: Path, m: LinearMap, data: str, device: str) -> KroneckerEigen | None:
    if not path.is_file():
        return None
    tensors, meta = load_tensors_and_metadata(path, RunError, device)
    return basis_from_tensors(tensors, m.name, tuple(m.shape), False, "", str(path)) if meta.get("data") == data else None


def fit_owned(pipeline, point: Point, maps: Sequence[LinearMap], groups: list[list[LinearMap]] | None) -> dict:
    """Fit ``point``'s factors on owner ranks, partition by partition (``groups``; None: one of every map), as the
    module docstring says; rank 0 writes ``curvature.json`` at the end. Returns what each rank held (every rank)."""
    ranks, final, s = pipeline.ranks, point.factors_dir, pipeline.cfg.factors.settings()
    adapter, device = pipeline.adapter, ranks.device
    owner = owner_ranks(maps, ranks.world_size)
    data = {"data": combine_digests(pipeline.data.fit_digests())}
    common = dict(fisher=s.fisher, batch_size=s.batch_size, seed=s.seed, progress=False)
    ekfac, fingerprint = s.strategy == "ekfac", adapter.fingerprint()
    owned_bytes = pass_bytes = 0
    kept_in = covariance_torch_dtype(s.covariance_dtype, adapter.dtype)
    for i, group in enumerate(groups or [list(maps)]):
        part = None if groups is None else i
        if partition_done(final, [m.name for m in group], data):
            continue
        mine = [m for m in group if owner[m.name] == ranks.rank]
        pass_bytes = max(pass_bytes, sum(_covariance_bytes(m, kept_in) for m in group))
        cov = pipeline._accumulate(point, "covariance", lambda ex, group=group: collect_covariance_stats(
            adapter, ex, group, **common, covariance_dtype=s.covariance_dtype), part, owner)
        n_examples = cov.counts[f"{group[0].name}/s"]
        owned_bytes += _bytes(*cov.sums.values())
        bases = {}
        for m in mine:  # (one map's eigendecomposition at a time, its covariances dropped once decomposed)
            path = _basis_path(final, m.name)
            basis = _read_basis(path, m, data["data"], device) if ekfac else None
            if basis is None:
                basis = KroneckerEigen.from_covariances(cov.mean(f"{m.name}/a"), cov.mean(f"{m.name}/s"))
                if ekfac:
                    write_or_explain(path, lambda p=path, b=basis: save_tensors(
                        p, {k: getattr(b, k) for k in BASIS_TENSORS}, data), "The passes are kept in factors/statistics/.")
            del cov.sums[f"{m.name}/a"], cov.sums[f"{m.name}/s"]
            bases[m.name] = basis
            owned_bytes += _bytes(*(getattr(basis, k) for k in BASIS_TENSORS))
        if ekfac:
            ranks.barrier()  # (every owner's bases written)
            every = {m.name: bases[m.name] if m.name in bases else _read_basis(_basis_path(final, m.name), m,
                                                                                   data["data"], device) for m in group}
            if any(b is None for b in every.values()):
                raise RunError(f"{final / 'partial'}: an owner's eigenbasis is missing; run again to resume")
            pass_bytes = max(pass_bytes, sum(_bytes(*(getattr(b, k) for k in BASIS_TENSORS)) + _bytes(b.eigenvalues)
                                             for b in every.values()))
            eig = pipeline._accumulate(point, "eigenvalues", lambda ex, every=every, group=group: collect_eigenvalue_stats(
                adapter, ex, every, group, **common), part, owner)
            del every
            bases = {name: b.with_eigenvalues(eig.mean(name)) for name, b in bases.items()}
            owned_bytes += _bytes(*eig.sums.values())
        if bases:
            owned = EKFACCurvature(bases, s.strategy, fingerprint=fingerprint, n_examples=n_examples)
            write_or_explain(final / "maps", lambda owned=owned: save_partition(final, owned, data),
                             "The factors of the maps written before it are intact.")
        del bases
        ranks.barrier()
    if ranks.is_main:
        write_or_explain(final, lambda: stored_curvature(final, [m.name for m in maps], s),
                         "The factors of every map are intact in factors/maps/.")
    return {"rank": ranks.rank, "maps": sorted(n for n, r in owner.items() if r == ranks.rank),
            "owned_bytes": owned_bytes, "pass_bytes": pass_bytes}


def _covariance_bytes(m: LinearMap, dtype) -> int:
    """The bytes of map ``m``'s two covariance sums kept in ``dtype`` (a torch dtype)."""
    d_out, d_in = m.shape
    return (d_in**2 + d_out**2) * dtype.itemsize
