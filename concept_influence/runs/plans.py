"""A run's memory plan (:mod:`concept_influence.plan`) and the partitions of maps its factors are fitted in.

``[factors] partitions`` says how the run fits its factors: ``"none"``, every tracked map at once (one covariance and
one eigenvalue pass, every factor in one file: the plan's ``current`` engine); ``N``, N groups of maps in order, cut
at equal shares of the covariance bytes (:func:`~concept_influence.curvature.split_maps`), each with its own passes,
its factors written per map and freed before the next, and the query preconditioned by streaming them (the
``partitioned`` engine with those groups); ``"auto"`` (default), ``"none"`` when the current engine's plan fits
``[model] device_memory`` (or no device limit is known, as on the CPU), else the partitioned plan's partitions.
:func:`run_plan` is the plan of the run as it will run, which ``run`` checks before any work
(:func:`check_memory_plan`) and ``concept-influence plan`` prints; its partitions are the run's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..config import RunConfig
from ..curvature import split_maps
from ..curvature.registry import FITTED_FROM_DATA
from ..models import block_of_hook
from ..models.hugging_face import parse_track
from ..plan import Plan, PlanSettings, format_bytes, model_shape, parse_bytes, plan_memory
from .checkpoints import model_folder
from .folder import Run, RunError, read_json

__all__ = ["plan_for_config", "planned_strategy", "run_plan", "factor_partitions", "check_memory_plan", "device_memory",
           "factor_dtype"]


def plan_for_config(config: RunConfig, settings: PlanSettings | None = None, **changes: Any) -> Plan:
    """The memory plan (:func:`concept_influence.plan.plan_memory`) of a run config: its model (built on the meta
    device from the config of ``[model] path``), its tracked maps (``[model] track``, blocks up to the concept's hook),
    batch size, strategy and lengths; ``settings`` and ``changes`` as :func:`~concept_influence.plan.plan_memory`
    takes them, and ``partitions`` may be a count (split as the run splits its maps)."""
    m = config.model
    weights, selection = parse_track(m.track)
    shape = model_shape(model_folder(m), dtype=m.dtype, track=weights, select=selection,
                        max_block=block_of_hook((config.probe or config.concept).hook), base=m.base)
    if isinstance(changes.get("partitions"), int):
        changes["partitions"] = tuple(tuple(x.name for x in g) for g in split_maps(shape.maps, changes["partitions"]))
    s = replace(settings or PlanSettings(), batch_size=config.factors.batch_size, max_length=config.data.max_length,
                strategy=planned_strategy(config), factor_dtype=factor_dtype(config))
    return plan_memory(shape, s, **changes)


def planned_strategy(config: RunConfig) -> str:
    """The strategy the plan counts: ``[factors] strategy`` when fitted from the data, else EK-FAC, whose scoring
    bounds the run's (``adam_state`` is read, not fitted: its scales are the size of EK-FAC's eigenvalues)."""
    return config.factors.strategy if config.factors.strategy in FITTED_FROM_DATA else "ekfac"


def factor_dtype(config: RunConfig) -> str:
    """The factors' dtype the plan counts: float64 with float64 covariances, else float32 (bfloat16 covariances are
    counted at float32: the eigenbases are float32 whatever they are summed in)."""
    return "float64" if config.factors.covariance_dtype == "float64" else "float32"


def run_plan(config: RunConfig, limit: int | None, **changes: Any) -> Plan:
    """The plan of the run as it runs on a device of ``limit`` bytes (None: no limit): the engine and partitions
    ``[factors] partitions`` gives (see the module docstring), the run's queries (``[scoring] query_rank``, the
    stability variants' as further concepts)."""
    common = dict(device_memory=limit, concepts=_query_sets(config), query_rank=config.scoring.query_rank, **changes)
    p = config.factors.partitions
    if config.factors.path is not None:  # (not fitted: its factors stream when they are saved per map)
        saved = Path(config.factors.path) / "curvature.json"
        streams = saved.is_file() and read_json(saved).get("storage") == "maps"
        return plan_for_config(config, engine="partitioned" if streams else "current", **common)
    if p == "none" or p == "auto" and limit is None or planned_strategy(config) != config.factors.strategy:
        return plan_for_config(config, engine="current", **common)  # (adam_state: one file, every map's scales)
    if p == "auto":
        current = plan_for_config(config, engine="current", **common)
        if current.fits:
            return current
        return plan_for_config(config, engine="partitioned", **common)
    return plan_for_config(config, engine="partitioned", partitions=p, **common)


def factor_partitions(config: RunConfig, maps: Sequence) -> list[list] | None:
    """The groups of ``maps`` the run fits its factors in (None: all at once, one file), as :func:`run_plan` says."""
    p = config.factors.partitions
    if isinstance(p, int):
        return split_maps(maps, p)
    limit = device_memory(config)
    if p == "none" or limit is None:
        return None
    plan = run_plan(config, limit)
    if plan.engine == "current":
        return None
    plan.check()
    return split_maps(maps, plan)


#: The plan's stages each run stage goes through (:mod:`concept_influence.plan`).
_PLANNED = {"factors": ("load", "covariance pass", "eigendecomposition", "eigenvalue pass"),
            "scores": ("load", "query", "scoring")}


def check_memory_plan(path: str | Path | None, config: RunConfig | None, stages: Sequence[str] = tuple(_PLANNED)) -> None:
    """Before any work: the memory plan of the run as it will run (:func:`run_plan`), checked against ``[model]
    device_memory`` (auto: a CUDA device's own memory, no check on the CPU). A stage of ``stages`` that does not fit is
    a :class:`RunError` in one line naming the plan's stage and its bytes; nothing is written. The queries of the
    stability variants scored beside the run's count as further concepts; full-size queries that do not fit where
    queries of lower rank would are an error saying which ``[scoring] query_rank`` fits."""
    if config is None and path is not None and (Path(path) / "config.json").is_file():
        config = Run.open(path).config
    if config is None:
        return
    limit = device_memory(config)
    if limit is None:
        return
    from ..estimators import ESTIMATORS

    plan = run_plan(config, limit)
    fitted = config.factors.path is None and config.factors.strategy in FITTED_FROM_DATA  # (not: read from a file)
    checked = [name for stage in stages for name in _PLANNED.get(stage, ())
               if stage != "factors" or ("curvature" in ESTIMATORS[config.scoring.estimator].run_inputs and fitted)]
    if "scores" in stages and config.scoring.estimator != "concept_influence":
        checked = [name for name in checked if name not in ("query", "scoring")]  # (the plan's scoring is EK-FAC's)
    usable = plan.settings.device_limit
    for st in plan.stages:
        if st.stage in checked and st.device > usable:
            raise RunError(f"{config.model.path}: the run does not fit the device: {st.stage} needs "
                           f"{format_bytes(st.device)} on the device, {format_bytes(usable)} usable of "
                           f"{format_bytes(limit)} ([model] device_memory = {config.model.device_memory!r}); nothing "
                           "was computed. `concept-influence plan` shows every stage; track fewer maps ([model] "
                           "track), lower [factors] batch_size, or set device_memory = \"none\" to run anyway")
    if "query" in checked and plan.query_rank != config.scoring.query_rank:
        raise RunError(f"{config.model.path}: the run does not fit the device: full-size queries do not fit "
                       f"{format_bytes(usable)} usable of {format_bytes(limit)}; queries of rank {plan.query_rank} "
                       f"do: set [scoring] query_rank = {plan.query_rank}; nothing was computed")


def _query_sets(config: RunConfig) -> int:
    """The sets of queries the scoring holds: the run's own and one per stability variant of its curvature (that of
    ``factors.path`` when given)."""
    from ..curvature import variant_kinds

    strategy, saved = config.factors.strategy, Path(config.factors.path or "") / "curvature.json"
    if config.factors.path is not None and saved.is_file():
        strategy = read_json(saved).get("strategy", strategy)
    return 1 + len(variant_kinds(strategy))


def device_memory(config: RunConfig) -> int | None:
    """``[model] device_memory`` in bytes: a size as given, ``auto``: the memory of the CUDA device the run uses (none
    on the CPU), ``none``: None."""
    value = config.model.device_memory
    if value == "none":
        return None
    if value != "auto":
        return parse_bytes(value)
    import os

    import torch

    if config.model.device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
