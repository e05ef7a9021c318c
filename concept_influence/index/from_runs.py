"""Gradient indexes over run folders: one checkpoint per run (its model, probe, factors and data), built and queried
from the command line.

Building first runs the run's probe and factors stages where they have not run (resumable and distributed as run
folders are); the index then covers the maps of the run's factors (blocks up to the probe's) and projects them with the
run's EK-FAC (a run whose ``[factors] strategy = "adam_state"``: the identity projection only, exact). A run with
``[model] checkpoints`` gives one index checkpoint per point, weighted as the run weights it.
Every run of one index must score the same data.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from ..config import RunConfig
from ..curvature import Curvature
from ..curvature.registry import method
from ..data import iter_shards, tokenize_kept
from ..distributed import Ranks, process_group
from ..fileio import path_sha256
from ..models import ModelAdapter
from ..runs import Pipeline, Run, RunError, preflight
from .build import IndexSettings, ShardInput, check_existing
from .gradient_index import GradientIndex, add_checkpoint
from .store import GradientIndexError
from .subspace import check_projection

__all__ = ["build_from_runs", "checkpoint_models", "checkpoint_run"]


def _open_run(source: str | Path, ranks: Ranks) -> Run:
    """A run folder, or the run folder of a config (its ``out``; rank 0 creates it when new)."""
    source = Path(source)
    if source.is_dir():
        return Run.open(source)
    config = RunConfig.read(source)
    if config.out is None:
        raise RunError(f"{source}: no run folder; set `out` in the config (or pass the run folder)")
    return ranks.main_first(lambda create: Run.open(config.out, config, create))


def _shards(run: Run, adapter: ModelAdapter, shard_size: int):
    data = run.config.data
    for shard in iter_shards(data.train, shard_size):
        yield ShardInput(shard.index, shard.digest, len(shard.examples),
                         lambda shard=shard: tokenize_kept(shard.examples, adapter.tokenizer, data.max_length,
                                                           data.skip_truncated)[0])


def build_from_runs(sources: Sequence[str | Path], out: str | Path, settings: IndexSettings | None = None,
                    weights: Sequence[float] | None = None, progress: bool = True) -> GradientIndex:
    """Index each run folder or run config of ``sources`` as one checkpoint (in order, each with its weight; default 1)
    into ``out``; resumes a started index. Under ``torchrun`` the runs' stages and the shards are shared between the
    processes."""
    settings = settings or IndexSettings()
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources):
        raise GradientIndexError(f"{len(weights)} weights for {len(sources)} runs")
    out = Path(out).resolve()
    with process_group(_device(sources[0])) as ranks:
        for source, weight in zip(sources, weights):
            run = _open_run(source, ranks)
            if out == run.path or run.path in out.parents:
                raise GradientIndexError(f"{out}: put the index outside the run folder {run.path}")
            cfg = run.config
            data = {"source": str(cfg.data.train), "sha256": path_sha256(cfg.data.train),
                    "max_length": cfg.data.max_length, "skip_truncated": cfg.data.skip_truncated}
            check_existing(out, settings, data)  # before the run's stages: another index's data is refused at once
            _check_projection(run, settings.projection)
            pipeline = Pipeline(run, ranks, progress)
            preflight(pipeline, ("probe", "factors"))  # (each input named, before any stage computes)
            pipeline.direction()
            pipeline.curvature()  # fits (or resumes) the factors at every point of the run
            for point in pipeline.points:  # the run's model, or each of its [model] checkpoints
                with pipeline.at(point):
                    adapter = pipeline.adapter
                    add_checkpoint(out, settings, adapter, Curvature.load(point.factors_dir, adapter),
                                   _shards(run, adapter, settings.shard_size), data,
                                   str(run.path) + (f"#{point.name}" if point.name else ""), weight * point.weight,
                                   {"run": str(run.path), "point": point.name}, ranks, progress)
    return GradientIndex(out)


def _check_projection(run: Run, projection: str) -> None:
    """Before any work: the run's ``[factors] strategy`` has what ``projection`` needs (a saved ``factors.path`` is
    checked when read)."""
    strategy = run.config.factors.strategy
    if run.config.factors.path is None:
        try:
            check_projection(projection, method(strategy), strategy)
        except ValueError as e:
            raise GradientIndexError(f"{run.path}: [factors] strategy = {strategy!r}: {e}; the identity projection "
                                     "takes any curvature") from None


def _device(source: str | Path) -> str:
    source = Path(source)
    config = Run.open(source).config if source.is_dir() else RunConfig.read(source)
    return config.model.device


def checkpoint_run(index: GradientIndex, c: int = 0) -> Run:
    """The run folder checkpoint ``c`` was built from (an index built in memory has none)."""
    if index.checkpoints[c]["model"] is None:
        raise GradientIndexError(f"{index.store.path}: checkpoint {c} was built from a model in memory; query it from "
                                 "Python with that model (GradientIndex.score)")
    return Run.open(index.checkpoints[c]["model"]["run"])


def checkpoint_models(index: GradientIndex) -> list[ModelAdapter]:
    """The model of each checkpoint, loaded as its run loads it (checked against the run's record), with the weights
    of the run's checkpoint it indexes."""
    out = []
    for c, entry in enumerate(index.checkpoints):
        run = checkpoint_run(index, c)
        pipeline = Pipeline(run, Ranks(device=_query_device(run)), progress=False)
        point = next(p for p in pipeline.points if p.name == entry["model"]["point"])
        with pipeline.at(point):
            out.append(type(pipeline.adapter)(copy.deepcopy(pipeline.adapter.model), pipeline.adapter.tokenizer))
    return out


def _query_device(run: Run) -> str:
    device = run.config.model.device
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
