"""Run folders that describe themselves, and the pipeline that fills them: probe → check → factors → scores → report
→ explain → filter (the check, explain and filter when the config asks for them).

A run folder holds::

    config.json          the resolved config; `concept-influence run RUN/config.json` replays the run
    run.json             format version, package versions, model and data fingerprints, a log of stages
    manifest.json        every finished file with its size and SHA-256
    probe/               direction.safetensors + .json (and metrics.json when trained here)
    check/               concept_check.json and .png: is the concept causal? (verdict, effect sizes)
    factors/             settings.json (the [factors] settings of the fit, with the SHA-256 of factors.extra_data
                         when given); partitions.json (the groups of maps fitted apart, or null); curvature.json with
                         curvature.safetensors, or with [factors] partitions maps/<map>.safetensors, one per map;
                         statistics/ the summed covariance and eigenvalue statistics of each pass (of each partition:
                         covariance-p00, ...); partial/ per-rank checkpoints while fitting
    scores/              settings.json (the [scoring] settings); shards/shard-000000.safetensors + .json, one per
                         `scoring.shard_size` examples; scores.* all shards merged in data order (one column per
                         concept); variants.* (and shards/variants-000000.*) the stability check's variants scored in
                         the same pass: damping x0.01 ... x100 (or horizon x0.1, x10), identity (:mod:`.stability`)
    report/              report.md (the check's verdict, top and bottom examples with their text) and
                         score_distribution.png
    checkpoints/NN-name/ with [model] checkpoints: factors/ and scores/ at each checkpoint (scores/ above holds
                         their weighted sum)
    explain/             explain.md, explain.json, latent_influence.png: SAE latents of the top examples
    filter/              the training file without the top of the ranking, and its .filter.json record

Every file is written atomically (temporary file + rename). Work is done shard by shard and each finished
shard is on disk, so a run killed at any point (even SIGKILL) and started again continues from the last
finished shard and ends with the same result, bit for bit. A shard is reused only when the SHA-256 of its
input records is unchanged, and a stage resumes only with the settings it started with. Under ``torchrun``
shards are dealt to ranks and curvature statistics are summed over ranks (:mod:`concept_influence.distributed`).

Modules: :mod:`.folder` (the folder, its record, manifest and checks), :mod:`.stages` (the :class:`Pipeline`),
:mod:`.checkpoints` (where factors and scores are computed), :mod:`.inputs` (the data in shards: the training data,
and what the factors are fitted on), :mod:`.shards` (shard files), :mod:`.audit` (check, explain, filter),
:mod:`.report` (``report.md``), :mod:`.stability` (the stability check), :mod:`.plans` (the memory plan and the
partitions of maps), :mod:`.partitioned` (factors fitted in partitions), :mod:`.optimizer` (``[factors] strategy =
"adam_state"``: the factors read from the fine-tune's ``optimizer.pt``, not fitted).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RunConfig
from ..distributed import Ranks, process_group
from .audit import causal_warning, check_stage, explain_stage, filter_stage
from .folder import RUN_FORMAT, RUN_FORMAT_VERSION, Run, RunError
from .optimizer import check_optimizer_states
from .plans import check_memory_plan, plan_for_config
from .stages import Pipeline

__all__ = ["RunError", "Run", "Pipeline", "run_config", "run_stages", "preflight", "plan_for_config", "check_memory_plan",
           "RUN_FORMAT", "RUN_FORMAT_VERSION", "STAGES"]

STAGES = ("probe", "check", "factors", "scores", "report", "explain", "filter")


def _open(path: str | Path | None, config: RunConfig | None, ranks: Ranks) -> Run:
    """Open (rank 0 creates) the run folder, then every rank reads it."""
    if path is None:
        raise ConfigError("no run folder: set `out` in the config or pass --out")
    return ranks.main_first(lambda create: Run.open(path, config, create))


def _device(path: str | Path | None, config: RunConfig | None) -> str:
    if config is None and path is not None and (Path(path) / "config.json").is_file():
        config = Run.open(path).config
    return config.model.device if config is not None else "auto"


def run_config(config: RunConfig, out: str | Path | None = None, progress: bool = True) -> Path:
    """Every stage of ``config`` in the run folder ``out`` (default ``config.out``); resumes a started run.
    Returns the report's path."""
    return run_stages(STAGES, out or config.out, config, progress, report_path=True)


def run_stages(stages: Sequence[str], path: str | Path | None, config: RunConfig | None = None, progress: bool = True,
               top_k: int | None = None, report_path: bool = False) -> Path:
    """Run ``stages`` (of :data:`STAGES`, in that order; ``check``, ``explain`` and ``filter`` only when the config
    asks for them) on the run folder ``path``, set up from ``config`` when it is new. Returns the path of the last
    stage's main output (``report_path``: of the report)."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    check_memory_plan(path, config, stages)
    with process_group(_device(path, config)) as ranks:
        pipeline = Pipeline(_open(path, config, ranks), ranks, progress)
        run, cfg = pipeline.run, pipeline.cfg
        out, report = run.path, run.path / "report" / "report.md"
        preflight(pipeline, stages)
        if "probe" in stages and cfg.probe is not None:
            pipeline.direction()
            out = run.direction_path
        if "check" in stages and cfg.checks_concept:
            out = check_stage(pipeline)
            _warn_unless_causal(run, ranks)
        if "factors" in stages:
            if pipeline.needs_factors:
                pipeline.curvature()
                out = run.factors_dir
            elif ranks.is_main:
                print(f"scoring.estimator = {cfg.scoring.estimator} needs no curvature; nothing to fit")
        if "scores" in stages:
            pipeline.scores()
            out = run.scores_path
        if "report" in stages and ranks.is_main:
            out = report = pipeline.report(top_k)
        if "explain" in stages and cfg.explain.sae is not None:
            out = explain_stage(pipeline)
        if "filter" in stages and cfg.filter.remove_top is not None:
            out = filter_stage(pipeline)
        if "report" in stages:
            _warn_unless_causal(run, ranks)
        return report if report_path and ranks.is_main else out


def preflight(pipeline: Pipeline, stages: Sequence[str]) -> None:
    """Inputs that late stages read, checked before the early ones compute: the checkpoints (found and weighed), the
    files of the factors, scores and explain stages, and with ``adam_state`` each point's optimizer state (read
    memory-mapped and matched to the model); a missing or unusable one is a :class:`RunError` naming its key."""
    run, cfg = pipeline.run, pipeline.cfg
    if not pipeline.points:
        raise RunError(f"{run.path}: nothing to score")
    late = [("factors", "factors.extra_data", lambda: cfg.factors.extra_data if pipeline.needs_factors else None),
            ("scores", "concept.eval", lambda: cfg.concept_eval), ("explain", "explain.sae", lambda: cfg.explain.sae)]
    for stage, key, path in late:
        if stage in stages and not run.is_done(stage) and path() is not None and not Path(path()).exists():
            raise RunError(f"{path()}: no such file or folder ({key})")
    if "factors" in stages:
        check_optimizer_states(pipeline)


def _warn_unless_causal(run: Run, ranks: Ranks) -> None:
    """Print :func:`causal_warning` to the terminal (stderr), on rank 0."""
    warning = causal_warning(run.record, run.config) if ranks.is_main else None
    if warning:
        bar = "!" * 100
        print(f"\n{bar}\n{textwrap.fill(warning, 100)}\n{bar}\n", file=sys.stderr)
