"""Files of the fitting and scoring stages on disk: score shards (reused only when their input records are
unchanged), merging them in data order, and the per-rank checkpoints of a curvature pass."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..curvature import SumStats
from ..fileio import load_tensors_and_metadata
from ..provenance import combine_digests
from ..scores import Scores
from .folder import RunError

__all__ = ["concatenate", "finished_shard", "read_checkpoint", "resume_pass"]


def concatenate(parts: Sequence[Scores], estimator: str) -> Scores:
    """Shards in data order as one :class:`Scores` (per-module and per-token shares too, when kept); the
    metadata notes how many lines were skipped (responses cut away at ``data.max_length``)."""
    ids = [i for part in parts for i in part.ids]
    metadata = {k: v for k, v in parts[-1].metadata.items() if k not in ("shard_digest", "shard", "n_lines")}
    metadata["n_skipped"] = sum(part.metadata["n_lines"] for part in parts) - len(ids)
    kept = [part for part in parts if len(part)]
    per_module = per_token = None
    if kept and kept[0].per_module is not None:
        per_module = {name: np.concatenate([p.per_module[name] for p in kept]) for name in kept[0].per_module}
    if kept and kept[0].per_token is not None:
        per_token = {i: v for p in kept for i, v in p.per_token.items()}
    return Scores(ids, np.concatenate([part.values for part in parts]), estimator, parts[-1].columns, metadata,
                  per_module, per_token)


def finished_shard(path: Path, digest: str) -> Scores | None:
    """The shard saved at ``path`` if it was computed from input records with this ``digest``; None when it is
    missing, stale, or unreadable (with a warning: it is computed again)."""
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    try:
        shard = Scores.load(path)
    except (ValueError, KeyError, UnicodeDecodeError):
        warnings.warn(f"{path}: unreadable shard; it is computed again")
        return None
    return shard if shard.metadata.get("shard_digest") == digest else None


def read_checkpoint(path: Path, device: str) -> tuple[SumStats, dict[str, str]] | None:
    """A curvature checkpoint and its metadata, on ``device`` (where the pass goes on adding to it); None (with a
    warning) when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = load_tensors_and_metadata(path, RunError, device)
        return SumStats.from_state_dict(tensors), metadata
    except (RunError, KeyError) as e:
        warnings.warn(f"{path}: unreadable checkpoint ({e}); its pass starts over")
        return None


def resume_pass(ckpt: Path, name: str, digests: Sequence[str], device: str) -> tuple[SumStats, int]:
    """The sums of pass ``name`` so far from this rank's checkpoint (on ``device``) and the first shard still to do;
    an empty start when there is no checkpoint, or when the data changed since it was written (with a warning)."""
    resumed = read_checkpoint(ckpt, device)
    if resumed is None:
        return SumStats(), 0
    start = int(resumed[1].get("next_shard", 0))
    if resumed[1].get("data") == combine_digests(digests[:start]):
        return resumed[0], start
    warnings.warn(f"{ckpt}: the training data changed since this checkpoint; pass {name!r} starts over")
    return SumStats(), 0
