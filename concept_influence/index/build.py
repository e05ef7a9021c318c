"""Building a gradient index: one forward+backward per batch (the scoring engine's pipeline,
:func:`~concept_influence.gradients.captured_batches`), each map's tokens projected and contracted into the example's
row, one file per data shard.

Shards are dealt to ``torchrun`` ranks as run folders deal them (shard ``i`` to rank ``i mod world size``); rank 0
writes the manifest and the projections; a shard already on disk with the same input digest is not computed again,
so a killed build started again finishes with the same files, bit for bit.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..curvature import Curvature
from ..data import TokenizedExample
from ..distributed import Ranks
from ..gradients import captured_batches, check_finite
from ..models import LinearMap, ModelAdapter
from ..options import Settings, option, settings_diff
from ..provenance import invocation, package_versions
from .store import FORMAT, FORMAT_VERSION, STORAGE_DTYPES, GradientIndexError, IndexStore
from .subspace import PROJECTIONS, MapSpace, make_spaces, space_ranks

__all__ = ["IndexSettings", "ShardInput", "memory_shards", "check_existing", "start_index", "build_checkpoint"]


@dataclass
class IndexSettings(Settings):
    """How an index is built (saved in its manifest; a resumed build must use the same)."""

    projection: str = option("eigen", "per-map projection of the gradients: the top `rank` EK-FAC eigenvectors of each "
                                      "side (eigen), random orthonormal subspaces (random, LoGra), none (identity: exact "
                                      "and as large as the gradients)", choices=PROJECTIONS)
    rank: int | None = option(None, "dimensions kept on each side of each map (r_out = min(rank, d_out), r_in "
                                    "likewise); unset: the largest rank whose rows fit in `budget`", minimum=1)
    budget: int = option(65536, "bytes per example and checkpoint when `rank` is unset", minimum=1)
    dtype: str = option("float16", "storage dtype of the rows", choices=tuple(STORAGE_DTYPES))
    shard_size: int = option(1024, "examples per shard file (the unit of resuming and of torchrun's work)", minimum=1)
    batch_size: int = option(8, "examples per forward/backward", minimum=1)
    loss_tokens: str = option("response", "the tokens whose loss L(z) is differentiated", choices=("response", "all"))
    seed: int = option(0, "seed of the random projection")


@dataclass
class ShardInput:
    """One data shard to index: its position, the digest of its input records, its line count and its examples
    (tokenised when called: only shards still to compute are tokenised)."""

    index: int
    digest: str
    n_lines: int
    examples: Callable[[], list[TokenizedExample]]


def memory_shards(examples: Sequence[TokenizedExample], shard_size: int) -> list[ShardInput]:
    """Tokenised examples held in memory as shards (digest: SHA-256 of their ids and tokens)."""
    out = []
    for index, start in enumerate(range(0, len(examples), shard_size)):
        part = list(examples[start:start + shard_size])
        h = hashlib.sha256()
        for e in part:
            h.update(f"{e.id}\0{e.response_start}\0{','.join(map(str, e.input_ids))}\n".encode())
        out.append(ShardInput(index, h.hexdigest(), len(part), lambda part=part: part))
    return out


def resolve_rank(settings: IndexSettings, maps: Sequence[LinearMap]) -> int:
    """``settings.rank``, or the largest rank whose row (every map, ``min(r, d)`` per side) fits in ``settings.budget``
    bytes (at least 1)."""
    if settings.rank is not None:
        return settings.rank
    itemsize, largest = STORAGE_DTYPES[settings.dtype].itemsize, max(max(m.shape) for m in maps)

    def size(r: int) -> int:
        return itemsize * sum(min(r, m.shape[0]) * min(r, m.shape[1]) for m in maps)

    return max([r for r in range(1, largest + 1) if size(r) <= settings.budget], default=1)


def _map_entries(maps: Sequence[LinearMap], settings: IndexSettings, rank: int) -> list[dict]:
    """Each map's place in a row: name, block, shape, ranks, width and first column."""
    entries, offset = [], 0
    for m in maps:
        ranks = space_ranks(settings.projection, rank, m.shape)
        entries.append({"name": m.name, "block": m.block, "shape": list(m.shape), "ranks": list(ranks),
                        "dim": ranks[0] * ranks[1], "offset": offset})
        offset += ranks[0] * ranks[1]
    return entries


def check_existing(path: Path, settings: IndexSettings, data: dict) -> IndexStore | None:
    """The index at ``path`` when there is one, after checking that it was built with ``settings`` on ``data`` (each
    difference named); None when there is none yet."""
    if not (path / "index.json").is_file():
        return None
    store = IndexStore.open(path)
    checks = (("with other settings", store.manifest["settings"], settings.to_dict(),
               "use a new index folder for new settings, or put them back"),
              ("on other data", store.manifest["data"], data, "every checkpoint of an index scores the same examples"))
    for what, old, new, advice in checks:
        changed = settings_diff(old, new)
        if changed:
            raise GradientIndexError(f"{path}: the index was built {what} ({'; '.join(changed)}); {advice}")
    return store


def start_index(path: Path, settings: IndexSettings, maps: Sequence[LinearMap], data: dict) -> IndexStore:
    """The index at ``path``: created with ``settings``, the maps' layout and the ``data`` description, or opened and
    checked (same settings, maps and data; each difference named). Writes nothing to an existing index."""
    rank = resolve_rank(settings, maps)
    layout = _map_entries(maps, settings, rank)
    store = check_existing(path, settings, data)
    if store is not None:
        if store.manifest["maps"] != layout:
            raise GradientIndexError(f"{path}: the index holds maps {', '.join(e['name'] for e in store.manifest['maps'])}, "
                                     f"this model's are {', '.join(e['name'] for e in layout)}; use a new index folder")
        return store
    if path.exists() and any(path.iterdir()):
        raise GradientIndexError(f"{path} exists and is not a gradient index; choose an empty or new folder")
    store = IndexStore(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "created": _now(),
                              "versions": package_versions(), "settings": settings.to_dict(), "rank": rank, "maps": layout,
                              "data": data, "checkpoints": []})
    store.save_manifest()
    return store


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def checkpoint_spaces(store: IndexStore, c: int, maps: Sequence[LinearMap], curvature: Curvature,
                      ranks: Ranks) -> list[MapSpace]:
    """Checkpoint ``c``'s spaces: read back when saved (a resumed build projects exactly as before), else made from
    ``curvature`` and saved by rank 0 (with the full curvature for the identity projection). Every rank passes the
    same barriers whatever it finds on disk."""
    path = store.checkpoint_dir(c) / "spaces.safetensors"
    saved = path.is_file()
    ranks.barrier()  # every rank looks before rank 0 writes: all take the same branch, so all pass the same barriers
    if not saved:
        s = store.manifest["settings"]
        spaces = make_spaces(s["projection"], store.manifest["rank"], maps, curvature, s["seed"])
        if ranks.is_main:
            if s["projection"] == "identity":
                curvature.save(store.checkpoint_dir(c) / "curvature")
            store.save_spaces(c, spaces)
        ranks.barrier()
    return store.load_spaces(c)


def build_checkpoint(store: IndexStore, c: int, adapter: ModelAdapter, maps: Sequence[LinearMap],
                     spaces: Sequence[MapSpace], shards: Iterable[ShardInput], ranks: Ranks, progress: bool = True) -> None:
    """Compute and write this rank's shards of checkpoint ``c`` (those not already on disk with the same input digest);
    then rank 0 checks every shard and notes the checkpoint as finished in the manifest."""
    s = store.manifest["settings"]
    entry = store.manifest["checkpoints"][c]
    digests = []
    bar = tqdm(desc=f"index checkpoint {c}", unit="shard", disable=not progress)
    for shard in shards:
        digests.append(shard.digest)
        if not ranks.owns(shard.index):
            continue
        header = store.shard_header(c, shard.index)
        if header is None or header.get("digest") != shard.digest:
            rows, ids = _shard_rows(adapter, shard.examples(), maps, spaces, s, store.dtype)
            store.write_shard(c, shard.index, rows, ids, shard.digest, shard.n_lines)
        bar.update(1)
    bar.close()
    if not digests:
        raise GradientIndexError("the training data has no examples")
    ranks.barrier()
    if ranks.is_main:
        n_examples = n_lines = 0
        for index, digest in enumerate(digests):
            header = store.shard_header(c, index)
            if header is None or header.get("digest") != digest:
                raise GradientIndexError(f"{store.shard_path(c, index)}: missing or stale shard; run the same command "
                                         "again to compute it")
            n_examples += len(header["ids"])
            n_lines += int(header["n_lines"])
        entry.update(n_shards=len(digests), digests=digests, n_examples=n_examples, n_skipped=n_lines - n_examples,
                     finished=_now(), world_size=ranks.world_size, command=invocation())
        store.save_manifest()
    ranks.barrier()


def _shard_rows(adapter: ModelAdapter, examples: list[TokenizedExample], maps: Sequence[LinearMap],
                spaces: Sequence[MapSpace], settings: dict, dtype: torch.dtype) -> tuple[torch.Tensor, list[str]]:
    """The rows ``[n, D]`` (storage dtype, clamped to its range) and ids of one shard's examples."""
    width = sum(sp.dim for sp in spaces)
    if not examples:
        return torch.zeros(0, width, dtype=dtype), []
    limit = torch.finfo(dtype).max
    rows = []
    for batch, captured in captured_batches(adapter, examples, maps, batch_size=settings["batch_size"],
                                            loss_tokens=settings["loss_tokens"], error=GradientIndexError,
                                            desc="index", progress=False):
        mask = batch.attention_mask.bool().to(adapter.device)
        block = torch.cat([sp.rows(*captured[sp.name], mask) for sp in spaces], dim=1)
        check_finite(block, batch, "projected gradient", GradientIndexError)
        rows.append(block.clamp_(-limit, limit).to(dtype).cpu())
    return torch.cat(rows), [e.id for e in examples]
