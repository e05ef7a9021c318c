"""A run folder's factors fitted in partitions of maps (``[factors] partitions``, :mod:`.plans`): one covariance and one
eigenvalue pass over the data per partition, each checkpointed per shard like the unpartitioned passes
(``statistics/covariance-p00.safetensors``, ``partial/covariance-p00-rank0of1.safetensors``, ...); each partition's
factors written per map to ``factors/maps/`` (the data's digest in each file's header) and freed before the next; at
the end ``curvature.json`` lists every map, and scoring reads the factors one map at a time.

The partitions are recorded in ``factors/partitions.json`` when the fit starts (null: every map at once), so a resumed
run keeps them whatever the device it resumes on; it skips the partitions whose factors are on disk from the same data
and resumes the others at the pass and shard they stopped at.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Sequence

from ..curvature import CurvatureError, fit_curvature, split_maps
from ..curvature.partitions import partition_done, save_partition, stored_curvature
from ..fileio import atomic_write_text
from ..models import LinearMap
from ..provenance import combine_digests
from .checkpoints import Point
from .folder import RunError, read_json, write_or_explain
from .plans import factor_partitions

__all__ = ["run_partitions", "fit_partitions", "PARTITIONS_FILE"]

PARTITIONS_FILE = "partitions.json"


def run_partitions(pipeline, point: Point, maps: Sequence[LinearMap]) -> list[list[LinearMap]] | None:
    """The partitions ``point``'s factors are fitted in (None: every map at once): those recorded when its fit started,
    else :func:`~.plans.factor_partitions`, recorded now."""
    path = point.factors_dir / PARTITIONS_FILE
    if pipeline.ranks.is_main and not path.is_file():
        groups = factor_partitions(pipeline.cfg, maps)
        names = None if groups is None else [[m.name for m in g] for g in groups]
        atomic_write_text(path, json.dumps({"partitions": names}, indent=2) + "\n")
    pipeline.ranks.barrier()
    saved = read_json(path)
    if not isinstance(saved, dict) or "partitions" not in saved:
        raise RunError(f"{path}: expected {{\"partitions\": null or lists of map names}}; use a new run folder")
    if saved["partitions"] is None:
        return None
    try:
        return split_maps(maps, saved["partitions"])
    except CurvatureError as e:
        raise RunError(f"{path}: {e}; the partitions recorded when the fit started no longer match the tracked maps: "
                       "use a new run folder") from None


def fit_partitions(pipeline, point: Point, maps: Sequence[LinearMap], groups: list[list[LinearMap]]) -> None:
    """Fit ``groups`` in turn (see the module docstring); rank 0 writes the factors and, at the end, ``curvature.json``."""
    final, ranks, settings = point.factors_dir, pipeline.ranks, pipeline.cfg.factors.settings()
    data = {"data": combine_digests(pipeline.data.fit_digests())}
    for i, group in enumerate(groups):
        if partition_done(final, [m.name for m in group], data):
            continue
        part = fit_curvature(pipeline.adapter, [], group, settings, progress=False,
                             accumulate=partial(pipeline._accumulate, point, part=i))
        if ranks.is_main:
            write_or_explain(final / "maps", lambda part=part: save_partition(final, part, data),
                             f"The factors of the {i} partition(s) before it are intact; its passes are in "
                             "factors/statistics/.")
        del part  # (freed before the next partition)
        ranks.barrier()
    if ranks.is_main:
        write_or_explain(final, lambda: stored_curvature(final, [m.name for m in maps], settings),
                         "The factors of every partition are intact in factors/maps/.")
