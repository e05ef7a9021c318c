"""``concept-influence plan RUN_OR_CONFIG``: bytes per stage on the device, the host and disk, read from the model's
config alone (meta device), and the partitions of maps that fit (:mod:`concept_influence.plan`)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

__all__ = ["add_plan_command", "plan_source"]


def _selection_args(args: argparse.Namespace):
    """The :class:`MapSelection` of ``--kinds/--names/--blocks`` (None when none is given)."""
    from .models import MapSelection

    if not (args.kinds or args.names or args.blocks):
        return None
    kinds = [k.strip() for k in (args.kinds or "").split(",") if k.strip()]
    return MapSelection(kinds=tuple(kinds), names=tuple(args.names or ()), blocks=args.blocks)


def plan_source(source: str | Path):
    """What RUN_OR_CONFIG is: ``("config", RunConfig)`` for a run folder or a run config, else ``("model", path)`` for
    a model folder or a Hugging Face ``config.json``."""
    from .config import RunConfig
    from .plan import PlanError

    path = Path(source)
    if path.is_dir():
        if (path / "run.json").is_file() and (path / "config.json").is_file():
            return "config", RunConfig.read(path / "config.json")
        return "model", path
    if not path.is_file():
        raise PlanError(f"{path}: no such run folder, run config, model folder or config.json")
    if path.suffix == ".toml":
        return "config", RunConfig.read(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PlanError(f"{path}: cannot parse ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return "config", RunConfig.read(path)
    return "model", path


def _count_examples(config) -> int | None:
    train = Path(config.data.train)
    if train.suffix == ".jsonl" and train.is_file():
        with train.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def _plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .curvature import split_maps
    from .models import block_of_hook
    from .models.hugging_face import parse_track
    from .plan import PlanSettings, model_shape, parse_bytes, parse_device_memory, plan_memory
    from .runs.checkpoints import model_folder
    from .runs.plans import factor_dtype, planned_strategy

    kind, source = plan_source(args.source)
    select = _selection_args(args)
    limit = parse_bytes(args.device_memory) if args.device_memory or kind != "config" else \
        parse_device_memory(source.model.device_memory)
    settings = PlanSettings(device_memory=limit, host_memory=parse_bytes(args.host_memory),
                            world_size=args.world_size, margin=args.margin, concepts=args.concepts,
                            factor_dtype=args.factor_dtype or "float32", engine=args.engine or "partitioned")
    read = False  # whether a run config's factors are read from a file (adam_state), not fitted
    if kind == "config":
        m = source.model
        weights, selection = parse_track(m.track)
        hook = (source.probe or source.concept).hook
        shape = model_shape(model_folder(m), dtype=args.dtype or m.dtype, track=args.weights or weights,
                            select=select or selection, max_block=block_of_hook(hook), base=m.base)
        settings = replace(settings, batch_size=source.factors.batch_size, max_length=source.data.max_length,
                           strategy=planned_strategy(source), query_rank=source.scoring.query_rank,
                           examples=_count_examples(source) or settings.examples)
        if args.factor_dtype is None:
            settings = replace(settings, factor_dtype=factor_dtype(source))
        p = source.factors.partitions  # the engine and partitions the run fits its factors with
        read = planned_strategy(source) != source.factors.strategy  # (every map's scales at once)
        if args.engine is None and (p == "none" or read):
            settings = replace(settings, engine="current")
        elif args.engine is None and isinstance(p, int) and args.world_size == 1:
            settings = replace(settings, partitions=tuple(tuple(x.name for x in g) for g in split_maps(shape.maps, p)))
    else:
        shape = model_shape(source, dtype=args.dtype, track=args.weights or "auto", select=select,
                            max_block=args.max_block, lora_rank=args.lora_rank)
    changes = {k: v for k, v in (("batch_size", args.batch_size), ("max_length", args.max_length),
                                 ("examples", args.examples), ("query_rank", args.query_rank),
                                 ("strategy", args.strategy)) if v is not None}
    plan = plan_memory(shape, replace(settings, **changes))
    print(plan.describe())
    if kind == "config" and read:
        print(f"\n[factors] strategy = {source.factors.strategy!r} is read from a file, not fitted: the run makes none of "
              "the factor stages above; its query and scoring are planned as EK-FAC's (an upper bound)")
    if plan.engine == "partitioned" and plan.settings.device_memory is not None:
        today = plan_memory(shape, plan.settings, engine="current", partitions=None)
        print("\nthe current engine (one partition, every factor on each rank): "
              + ("fits" if today.fits else f"does not fit: {today.failure}"))
    return 0 if plan.fits else 1


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory per stage (device, host, disk) and the partitions of maps, before a run",
        description=textwrap.fill(
            "Plan RUN_OR_CONFIG (a run folder, a run config, a model folder or a Hugging Face config.json) from the "
            "model's config alone (built on the meta device: no weights are read): bytes per stage (load, covariance "
            "pass, eigendecomposition, eigenvalue pass, query, scoring, index build) on the device (per rank), the "
            "host (per node) and disk; the partitions of the tracked maps whose passes fit the device, and the passes "
            "over the data they cost. Exit status 1 when the plan does not fit. See concept_influence/plan/ for the "
            "formulas and the two engines.", 100))
    p.add_argument("source", metavar="RUN_OR_CONFIG", help="run folder, run config (.toml/.json), model folder or "
                                                           "config.json")
    p.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 80GB or 80GiB (default: a run "
                                                           "config's [model] device_memory when a size, else no limit)")
    p.add_argument("--host-memory", metavar="SIZE", help="memory of the host (default: no limit)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="ranks, one device each (default 1)")
    p.add_argument("--margin", type=float, default=0.1, help="fraction of the device kept free (default 0.1)")
    p.add_argument("--engine", choices=("partitioned", "current"),
                   help="partitioned: partitions of maps, owner ranks, sharded weights (issue 27 items 3-4); current: "
                        "every map at once (default: as a run config's [factors] partitions says, else partitioned)")
    p.add_argument("--batch-size", type=int, help="examples per forward/backward (default: [factors] batch_size, or 8)")
    p.add_argument("--max-length", type=int, help="tokens per example (default: [data] max_length, or 512)")
    p.add_argument("--concepts", type=int, default=1, help="concepts queried at once (default 1)")
    p.add_argument("--examples", type=int, help="training examples scored (default: the lines of [data] train, or 1000)")
    p.add_argument("--query-rank", type=int, help="rank-r queries (default: full size, or the largest rank that fits)")
    p.add_argument("--strategy", help="a curvature strategy fitted in passes over the data, as [factors] strategy "
                                      "(default: the config's, or ekfac)")
    p.add_argument("--factor-dtype", choices=("float32", "bfloat16", "float64"),
                   help="dtype of covariances, eigenvectors and eigenvalues (default: float64 for a run config whose "
                        "[factors] covariance_dtype is float64, else float32)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the model's compute dtype (default: the run config's, or the model config's)")
    p.add_argument("--weights", choices=("auto", "lora", "full"), help="of a LoRA model: its factors or the full "
                                                                        "weight matrices (as [model] track)")
    p.add_argument("--kinds", metavar="KINDS", help="track maps of these kinds only: attention, mlp (comma-separated)")
    p.add_argument("--names", action="append", metavar="GLOB", help="track maps whose name matches GLOB (repeat)")
    p.add_argument("--blocks", metavar="RANGES", help="track maps of these blocks, e.g. 0-3 or 0-3,6")
    p.add_argument("--lora-rank", type=int, metavar="R", help="with a model folder: plan it with LoRA adapters of rank R "
                                                               "on every linear layer of its blocks")
    p.add_argument("--max-block", type=int, help="with a model folder: the concept's block (default: every block)")
    p.set_defaults(func=_plan)
