"""``[factors] strategy = "adam_state"`` in a run folder: TrackStar's optimizer-state correction
(:class:`~concept_influence.curvature.AdamStateCurvature`) read at each point from the fine-tune's ``optimizer.pt``
and saved as the point's factors, with no pass over the data.

The file is ``[factors] optimizer_state`` (one state for every point), else the point's own checkpoint folder (each of
``[model] checkpoints``: TRL's ``checkpoint-N/`` holds its ``optimizer.pt``), else the ``[model]`` folder (with
``checkpoints = "auto"``, its last ``checkpoint-N``). ``"base"`` has no optimizer state of its own. Before any stage,
:func:`check_optimizer_states` reads each file memory-mapped (its moments are not read) and matches its parameters to
the model's tracked maps, so a missing file or one of another model is one error naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..curvature import AdamStateCurvature, CurvatureError
from ..curvature.optimizer_state import check_optimizer_state, optimizer_file
from ..fileio import file_sha256
from .checkpoints import BASE, Point, model_folder
from .folder import RunError, write_or_explain

__all__ = ["ADAM", "optimizer_source", "check_optimizer_states", "read_optimizer_state"]

ADAM = "adam_state"


def optimizer_source(cfg: RunConfig, point: Point) -> tuple[Path, str]:
    """The ``optimizer.pt`` whose state corrects ``point``, and the config key that names it."""
    if cfg.factors.optimizer_state is not None:
        return optimizer_file(cfg.factors.optimizer_state), "factors.optimizer_state"
    if point.source == BASE:
        raise RunError('factors.strategy = "adam_state": the base model of model.checkpoints has no optimizer state; '
                       "give factors.optimizer_state (the checkpoint whose state corrects every point)")
    if point.name is not None:
        return optimizer_file(point.source), "model.checkpoints"
    return optimizer_file(model_folder(cfg.model)), "model.path"


def check_optimizer_states(pipeline) -> None:
    """With ``adam_state``: the optimizer state of every point whose factors are not read yet exists, loads with
    ``torch.load(weights_only=True)`` and matches the run's tracked maps; else a :class:`RunError` naming the file and
    the key. Nothing is written."""
    if pipeline.cfg.factors.strategy != ADAM or not pipeline.needs_factors:
        return
    for point in pipeline.points:
        if not pipeline.run.is_done(point.stage("factors")):
            path, key = optimizer_source(pipeline.cfg, point)
            try:
                check_optimizer_state(pipeline.adapter, path, pipeline.tracked_maps())
            except CurvatureError as e:
                raise RunError(f"{e} ({key})") from None


def read_optimizer_state(pipeline, point: Point) -> None:
    """The factors stage at ``point`` with ``adam_state``: the correction read from its ``optimizer.pt`` and saved as
    its curvature; ``run.json`` records the file, its SHA-256 and the power."""
    run, ranks, final = pipeline.run, pipeline.ranks, point.factors_dir
    path, key = optimizer_source(pipeline.cfg, point)
    settings = pipeline.data.fit_settings
    run.check_settings("factors", settings, final)
    if not (final / "curvature.json").is_file():
        pipeline.gate()
        with pipeline.at(point):
            try:
                curvature = AdamStateCurvature.from_checkpoint(pipeline.adapter, path, pipeline.tracked_maps(),
                                                               power=pipeline.cfg.factors.power)
            except CurvatureError as e:
                raise RunError(f"{e} ({key})") from None
        if ranks.is_main:
            run.save_settings("factors", settings, final)
            write_or_explain(final, lambda: curvature.save(final), "Nothing else was written.")
    if ranks.is_main and not run.is_done(point.stage("factors")):
        saved = json.loads((final / "curvature.json").read_text())
        run.finish_stage(point.stage("factors"), ranks, strategy=ADAM, n_examples=0,
                         maps=[m["name"] for m in saved["maps"]],
                         optimizer_state={"path": saved["source"], "sha256": file_sha256(saved["source"]),
                                          "power": saved["power"], "key": key})
    ranks.barrier()
