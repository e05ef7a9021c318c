"""Command line: ``concept-influence demo``; the run-folder pipeline ``run``, ``probe train``, ``fit-factors``,
``score``, ``report``; ``concept check`` and ``filter``; benchmarks ``bench planted``, ``bench medical``,
``bench speed``, ``bench memory``, ``bench gpu-check``, ``bench query-table``; ``sae ...`` (cli_sae.py); ``index ...``
(cli_index.py)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from .cli_bench import add_bench_commands
from .cli_concept import add_concept_commands, add_query_options, query_overrides
from .cli_emergent import add_emergent_commands
from .cli_index import add_index_commands
from .cli_plan import add_plan_command
from .cli_retrieve import add_retrieve_command
from .cli_sae import add_sae_commands
from .errors import ConceptInfluenceError

__all__ = ["main"]


WEAK_PROBE_HELP = ("go on with a probe whose held-out AUROC is below 0.6 (probe.allow_weak; refused by default: it "
                   "cannot tell the positive from the negative texts)")
def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo import demo_config, run_demo
    from .planted import command_line

    cfg = replace(demo_config(args.quick, args.seed), **query_overrides(args))
    run_demo(args.out, cfg, progress=not args.no_progress, command=command_line())
    return 0


def _run(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .runs import run_config

    _print_on_rank0(run_config(_allowing_weak_probe(RunConfig.read(args.config), args), args.out,
                               progress=not args.no_progress))
    return 0


def _allowing_weak_probe(config, args: argparse.Namespace):
    """``config`` with ``probe.allow_weak`` set when ``--allow-weak-probe`` is given (a run folder takes it)."""
    if config is not None and config.probe is not None and getattr(args, "allow_weak_probe", False):
        config.probe.allow_weak = True
    return config


def _print_on_rank0(path) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(path)


def _stage(*stages: str):
    def command(args: argparse.Namespace) -> int:
        from .config import RunConfig
        from .runs import run_stages

        config = RunConfig.read(args.config) if getattr(args, "config", None) else None
        if config is None and getattr(args, "allow_weak_probe", False):
            config = RunConfig.read(Path(args.run) / "config.json")
        config = _allowing_weak_probe(config, args)
        _print_on_rank0(run_stages(stages, args.run, config, progress=not getattr(args, "no_progress", False),
                                   top_k=getattr(args, "top_k", None)))
        return 0

    return command


def _settings_epilog() -> str:
    """The keys of the config's [factors] and [scoring] sections, from the settings dataclasses' help texts."""
    from .config import settings_help

    lines = [textwrap.fill(line, 100, subsequent_indent="      ", break_on_hyphens=False) for line in settings_help()]
    return "config keys of [factors] and [scoring] (key = default: help):\n  " + "\n  ".join(lines)


def _add_pipeline_commands(sub) -> None:
    launch = ("Under torchrun (e.g. `torchrun --nproc-per-node 2 -m concept_influence ...`) the work is shared "
              "between processes (gloo on CPU, NCCL on GPU).")
    run = sub.add_parser(
        "run", help="every stage of a run config: probe, check, factors, scores, report, explain, filter",
        description=textwrap.fill(
            "Run every stage of CONFIG (TOML or JSON; see concept_influence/config.py) in a run folder: train the "
            "probe, check that the concept is causal (concept.require = \"causal\" stops here otherwise), fit the "
            "EK-FAC factors and score the training data shard by shard (at each of model.checkpoints, then their "
            "weighted sum), write the report, and, when the config asks, explain the top with SAE latents "
            "([explain] sae) and write the filtered training file ([filter] remove_top). Starting the same command "
            "again resumes from the last finished shard; `concept-influence run RUN/config.json` replays a run. "
            + launch, 100),
        epilog=_settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", metavar="CONFIG", help="run config (.toml or .json)")
    run.add_argument("--out", help="run folder (default: the config's `out`)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--allow-weak-probe", action="store_true", help=WEAK_PROBE_HELP)
    run.set_defaults(func=_run)

    def stage(parent, name: str, help: str, description: str, stages: tuple[str, ...], progress: bool = True):
        p = parent.add_parser(name, help=help, description=description + " " + launch)
        p.add_argument("run", metavar="RUN", help="run folder")
        p.add_argument("--config", metavar="CONFIG",
                       help="set up RUN from this config when RUN is new (an existing RUN must hold the same config)")
        if progress:
            p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=_stage(*stages))
        return p

    probe = sub.add_parser("probe", help="concept probes").add_subparsers(dest="probe_command", required=True)
    train = stage(probe, "train", "train the run's probe (or adopt its saved direction)",
                  "Train the probe of RUN's config on its positive vs negative texts at probe.hook (or check and adopt "
                  "probe.direction); writes RUN/probe/.", ("probe",))
    train.add_argument("--allow-weak-probe", action="store_true", help=WEAK_PROBE_HELP)
    stage(sub, "fit-factors", "fit the run's EK-FAC factors (resumable)",
          "Fit the curvature (EK-FAC or K-FAC) of the maps up to the probe's block on the training data, shard by "
          "shard with a checkpoint after each; writes RUN/factors/. Needs the probe stage. With [factors] strategy = "
          "\"adam_state\", reads TrackStar's correction from the fine-tune's optimizer.pt instead (no pass over the "
          "data).", ("factors",))
    stage(sub, "score", "score the run's training data (resumable)",
          "Score every training example with scoring.estimator, one file per shard under RUN/scores/shards/, then "
          "merge them in data order into RUN/scores/scores.safetensors. Needs the probe stage (and the factors for "
          "concept_influence).", ("scores",))
    report = stage(sub, "report", "write the run's report: top/bottom examples with text, score plot",
                   "Write RUN/report/report.md (the top and bottom examples with their text) and "
                   "RUN/report/score_distribution.png from RUN's scores.", ("report",), progress=False)
    report.add_argument("--top-k", type=int, metavar="K", help="examples shown at each end (default: report.top_k)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="concept-influence",
                                     description="Which training examples put a concept into a language model.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the planted-data benchmark on the embedded corpus",
                          description="Run the planted-data benchmark on the embedded demo corpus (careful vs reckless "
                                      "advice, paired): pre-train a small model, fine-tune it with 10%% reckless answers "
                                      "planted, train a probe, rank the pool with every estimator, filter and retrain. "
                                      "Writes DIR/results.md, DIR/results.json and plots.")
    demo.add_argument("--out", required=True, help="output folder (data, tokenizer, probe, scores, results, plots)")
    demo.add_argument("--quick", action="store_true", help="a reduced size that finishes in about a minute on 2 cores")
    demo.add_argument("--seed", type=int, default=0, help="seed for the corpus, model, training and sampling (default 0)")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bars (the log lines and the table are still printed)")
    add_query_options(demo)
    demo.set_defaults(func=_demo)
    add_sae_commands(sub)  # sae train | latents | explain (concept_influence/cli_sae.py)

    _add_pipeline_commands(sub)
    add_plan_command(sub)  # plan RUN_OR_CONFIG: memory per stage before a run (concept_influence/cli_plan.py)

    bench = add_bench_commands(sub)  # bench planted | medical | speed | memory | gpu-check (concept_influence/cli_bench.py)
    add_concept_commands(sub, bench)  # concept check, filter, bench query-table (concept_influence/cli_concept.py)
    add_emergent_commands(bench)  # bench emergent, seeds-table, curvature-table (concept_influence/cli_emergent.py)
    add_index_commands(sub, bench)  # index build, index query, bench index (concept_influence/cli_index.py)
    add_retrieve_command(sub)  # retrieve: certified top k from a first stage (concept_influence/cli_retrieve.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConceptInfluenceError as e:  # bad input or a step that cannot go on: one line (anything else is a bug)
        print(f"concept-influence: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
