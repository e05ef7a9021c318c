"""The Python face of a gradient index: build it from a model in memory, open it, query it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..curvature import Curvature
from ..data import TokenizedExample
from ..distributed import Ranks
from ..estimators import GradientEstimator
from ..models import ModelAdapter
from ..scores import Scores
from .build import IndexSettings, ShardInput, build_checkpoint, checkpoint_spaces, memory_shards, start_index
from .store import GradientIndexError, IndexStore

__all__ = ["GradientIndex", "add_checkpoint"]


def add_checkpoint(path: Path, settings: IndexSettings, adapter: ModelAdapter, curvature: Curvature,
                   shards: Sequence[ShardInput] | Any, data: dict, source: str, weight: float, model: dict | None,
                   ranks: Ranks, progress: bool) -> IndexStore:
    """Index the model ``adapter`` (one checkpoint, identified by ``source``) on ``shards`` into the index at ``path``
    (created when new): the maps are those ``curvature`` covers. Resumes a started checkpoint; in a finished one only
    shards that are missing, unreadable or of changed input are computed again."""
    maps = [m for m in adapter.linear_maps() if m.name in curvature.shapes]
    fingerprint = adapter.fingerprint()
    if ranks.is_main:
        store = start_index(path, settings, maps, data)
        entries = store.manifest["checkpoints"]
        c = next((i for i, e in enumerate(entries) if e["source"] == source), len(entries))
        if c == len(entries):
            entries.append({"source": source, "model": model, "fingerprint": fingerprint, "weight": float(weight),
                            "finished": None})
            store.save_manifest()
        elif entries[c]["fingerprint"] != fingerprint:
            raise GradientIndexError(f"{path}: checkpoint {c} ({source}) was indexed on model {entries[c]['fingerprint']}, "
                                     f"now its model's fingerprint is {fingerprint}; use a new index folder")
    ranks.barrier()
    store = IndexStore.open(path)
    c = next(i for i, e in enumerate(store.manifest["checkpoints"]) if e["source"] == source)
    spaces = checkpoint_spaces(store, c, maps, curvature, ranks)
    build_checkpoint(store, c, adapter, maps, spaces, shards, ranks, progress)
    return IndexStore.open(path)


class GradientIndex:
    """A compressed gradient index, built once and queried many times (see :mod:`concept_influence.index`)."""

    def __init__(self, path: str | Path):
        self.store = IndexStore.open(path)

    @classmethod
    def build(cls, path: str | Path, adapter: ModelAdapter, examples: Sequence[TokenizedExample], curvature: Curvature,
              settings: IndexSettings | None = None, *, source: str | None = None, weight: float = 1.0,
              progress: bool = True, **changes: Any) -> "GradientIndex":
        """Index ``examples`` at the model's current weights (one checkpoint, named ``source``; default: its
        fingerprint) into the index at ``path``, created when new; call again with other weights to add checkpoints.
        ``curvature`` (fitted on the maps to index) gives the projection and the curvature in the projected space.
        ``settings`` (:class:`IndexSettings`), single ones as keywords (``rank=32``)."""
        s = (settings or IndexSettings()).replace(**changes)
        data = {"source": "memory", "examples": len(examples)}
        add_checkpoint(Path(path), s, adapter, curvature, memory_shards(examples, s.shard_size), data,
                       source or f"model {adapter.fingerprint()}", weight, None, Ranks(device=str(adapter.device)),
                       progress)
        return cls(path)

    @property
    def settings(self) -> IndexSettings:
        return IndexSettings(**self.store.manifest["settings"])

    @property
    def checkpoints(self) -> list[dict]:
        """One entry per checkpoint: source, model, fingerprint, weight, shard count, examples, when finished."""
        return list(self.store.manifest["checkpoints"])

    @property
    def maps(self) -> list[str]:
        return [m["name"] for m in self.store.manifest["maps"]]

    @property
    def bytes_per_example(self) -> int:
        """Bytes one example takes per checkpoint (its row)."""
        return self.store.dim * self.store.dtype.itemsize

    def score(self, estimator: GradientEstimator, adapters: ModelAdapter | Sequence[ModelAdapter], *,
              curvature: str = "ekfac", batch_size: int = 8, progress: bool = True, **options: Any) -> Scores:
        """``estimator``'s scores of every indexed example, summed over the checkpoints (``adapters``: the model at each;
        one model for an index of one checkpoint). ``curvature``: ``ekfac`` (default), ``empirical`` or ``identity``;
        see :func:`~concept_influence.index.query.index_scores` (also for ``options``)."""
        from .query import index_scores

        adapters = [adapters] if isinstance(adapters, ModelAdapter) else list(adapters)
        return index_scores(self.store, estimator, adapters, curvature=curvature, batch_size=batch_size,
                            progress=progress, **options)

    def texts(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``id -> (prompt, response)`` of the examples ``ids``, read from the data the index was built on (a file
        built from run folders); a :class:`GradientIndexError` when that data changed since the build."""
        from ..data import read_chats
        from ..fileio import path_sha256

        data = self.store.manifest["data"]
        if "sha256" not in data:
            raise GradientIndexError(f"{self.store.path}: the index was built from examples in memory; it records no "
                                     "data file to read texts from")
        if path_sha256(data["source"]) != data["sha256"]:
            raise GradientIndexError(f"{data['source']}: the data changed since the index was built, so its texts "
                                     "are not those of the indexed examples")
        wanted = set(ids)
        return {ex.id: (ex.prompt, ex.response) for ex in read_chats(data["source"]) if ex.id in wanted}
