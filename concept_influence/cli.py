"""Command line: ``concept-influence demo``; the run-folder pipeline ``run``, ``probe train``, ``fit-factors``,
``score``, ``report``; ``concept check`` and ``filter``; benchmarks ``bench planted``, ``bench medical``,
``bench speed``, ``bench memory``, ``bench query-table``; ``sae ...`` (cli_sae.py); ``index ...`` (cli_index.py)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .cli_concept import add_concept_commands, add_query_options, query_overrides, user_errors
from .cli_index import add_index_commands, index_errors
from .cli_sae import add_sae_benchmark_options, add_sae_commands, sae_benchmark_overrides

__all__ = ["main"]


PLANTED_SIZES = ("n_probe", "n_pretrain", "n_pool", "n_eval", "n_seeds", "n_layers", "d_model", "max_length", "layer",
                 "finetune_epochs", "pretrain_epochs")


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .benchmarks.planted import command_line
    from .demo import demo_config, run_demo

    cfg = replace(demo_config(args.quick, args.seed), **query_overrides(args))
    run_demo(args.out, cfg, progress=not args.no_progress, command=command_line())
    return 0


def _planted_config(args: argparse.Namespace, paired: bool):
    from .benchmarks.planted import BenchmarkError, PlantedConfig

    overrides = {k: getattr(args, k) for k in PLANTED_SIZES if getattr(args, k) is not None}
    try:
        fractions = tuple(float(f) for f in args.remove_fractions.split(","))
    except ValueError:
        raise BenchmarkError(f"--remove-fractions must be numbers separated by commas, got {args.remove_fractions!r}")
    overrides.update(rate=args.rate, paired=paired, seed=args.seed, lds=args.lds, remove_fractions=fractions)
    overrides.update(sae_benchmark_overrides(args))
    overrides.update(query_overrides(args))
    return PlantedConfig.quick(**overrides) if args.quick else PlantedConfig(**overrides)


def _run_planted(args: argparse.Namespace, clean, planted, paired: bool, names: tuple[str, str]) -> int:
    from .benchmarks.planted import command_line, run_planted
    from .data import load_chats

    cfg = _planted_config(args, paired)
    run_planted(load_chats(clean), load_chats(planted), args.out, cfg, progress=not args.no_progress,
                command=command_line(), data_names=names)
    return 0


def _bench_planted(args: argparse.Namespace) -> int:
    return _run_planted(args, args.clean, args.planted, args.paired, (args.clean, args.planted))


def _bench_medical(args: argparse.Namespace) -> int:
    from pathlib import Path

    files = [Path(args.data) / f"{kind}_medical_advice.jsonl.gz" for kind in ("good", "bad")]
    return _run_planted(args, *files, paired=True, names=tuple(f.name for f in files))


def _add_planted_options(p: argparse.ArgumentParser, default_rate: float | None) -> None:
    p.add_argument("--rate", type=float, default=default_rate, required=default_rate is None,
                   help="share of the training pool that gets the planted answer, in (0, 0.5]"
                        + (f" (default {default_rate})" if default_rate else ""))
    p.add_argument("--out", required=True, help="output folder: results.json, results.md, plots, scores, probe, tokenizer")
    p.add_argument("--seed", type=int, default=0, help="seed for the splits, model, training and sampling (default 0)")
    p.add_argument("--quick", action="store_true", help="a reduced size for tests (under a minute)")
    p.add_argument("--lds", type=int, default=0, metavar="M",
                   help="concept-LDS: fine-tune on M random subsets of the pool (--lds-fraction; default 0: skip)")
    p.add_argument("--remove-fractions", default="0.1", metavar="F[,F...]",
                   help="fractions of the pool removed from the top of each ranking before retraining (default 0.1)")
    p.add_argument("--n-seeds", type=int, help="fine-tuning seeds per behaviour measurement (default 3)")
    p.add_argument("--n-pool", type=int, help="training-pool size (default 1200)")
    p.add_argument("--n-pretrain", type=int, help="pre-training prompts, clean answers only (default 2500)")
    p.add_argument("--n-probe", type=int, help="probe prompts per class (default 400)")
    p.add_argument("--n-eval", type=int, help="evaluation prompts (default 200)")
    p.add_argument("--n-layers", type=int, help="blocks of the small model (default 2)")
    p.add_argument("--d-model", type=int, help="width of the small model (default 128)")
    p.add_argument("--max-length", type=int, help="tokens per example; longer responses are dropped (default 256)")
    p.add_argument("--layer", type=int, help="block of the probe (default: the last block)")
    p.add_argument("--pretrain-epochs", type=int, help="pre-training epochs (default 2)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_query_options(p)
    add_sae_benchmark_options(p)


def _bench_speed(args: argparse.Namespace) -> int:
    if args.size:
        from .benchmarks.speed_sizes import SizeConfig, run_size_benchmark

        given = {key: value for key, value in (("n_examples", args.examples), ("rounds", args.rounds)) if value is not None}
        run_size_benchmark(args.out, SizeConfig(size=args.size, seed=args.seed, kronfluence=not args.no_kronfluence,
                                                **given))
        return 0
    from .benchmarks.speed import run_speed_benchmark

    run_speed_benchmark(args.out, quick=args.quick, seed=args.seed, kronfluence=not args.no_kronfluence)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .runs import run_config

    _print_on_rank0(run_config(RunConfig.read(args.config), args.out, progress=not args.no_progress))
    return 0


def _print_on_rank0(path) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(path)


def _stage(*stages: str):
    def command(args: argparse.Namespace) -> int:
        from .config import RunConfig
        from .runs import run_stages

        config = RunConfig.read(args.config) if getattr(args, "config", None) else None
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
        "run", help="every stage of a run config: probe, factors, scores, report",
        description=textwrap.fill(
            "Run every stage of CONFIG (TOML or JSON; see concept_influence/config.py) in a run folder: train the "
            "probe, fit the EK-FAC factors, score the training data shard by shard, write the report. Starting the "
            "same command again resumes from the last finished shard; `concept-influence run RUN/config.json` "
            "replays a run. " + launch, 100),
        epilog=_settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", metavar="CONFIG", help="run config (.toml or .json)")
    run.add_argument("--out", help="run folder (default: the config's `out`)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    stage(probe, "train", "train the run's probe (or adopt its saved direction)",
          "Train the probe of RUN's config on its positive vs negative texts at probe.hook (or check and adopt "
          "probe.direction); writes RUN/probe/.", ("probe",))
    stage(sub, "fit-factors", "fit the run's EK-FAC factors (resumable)",
          "Fit the curvature (EK-FAC or K-FAC) of the maps up to the probe's block on the training data, shard by "
          "shard with a checkpoint after each; writes RUN/factors/. Needs the probe stage.", ("factors",))
    stage(sub, "score", "score the run's training data (resumable)",
          "Score every training example with scoring.estimator, one file per shard under RUN/scores/shards/, then "
          "merge them in data order into RUN/scores/scores.safetensors. Needs the probe stage (and the factors for "
          "concept_influence).", ("scores",))
    report = stage(sub, "report", "write the run's report: top/bottom examples with text, score plot",
                   "Write RUN/report/report.md (the top and bottom examples with their text) and "
                   "RUN/report/score_distribution.png from RUN's scores.", ("report",), progress=False)
    report.add_argument("--top-k", type=int, metavar="K", help="examples shown at each end (default: report.top_k)")


def _bench_memory(args: argparse.Namespace) -> int:
    from .benchmarks.memory import run_memory_benchmark

    sizes = (200, 1000) if args.quick else (1000, 50000)
    run_memory_benchmark(args.out, sizes=sizes, threads=args.threads, seed=args.seed)
    return 0


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

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    planted = bench.add_parser(
        "planted", help="planted-data benchmark over any two chat JSONL files",
        description="Split two chat JSONL files (.jsonl or .jsonl.gz) by prompt into probe, pre-training, pool and "
                    "evaluation sets; pre-train a small TransformerLens model on clean text; fine-tune it on the pool "
                    "with a share RATE of planted answers; train a probe; rank the pool with every estimator; measure "
                    "the behaviour of clean and planted fine-tunes and after removing the top of each ranking.")
    planted.add_argument("--clean", required=True, help="chat JSONL with the clean answers")
    planted.add_argument("--planted", required=True, help="chat JSONL with the planted-style answers")
    planted.add_argument("--paired", action="store_true",
                         help="line i of both files answers the same prompt (split by prompt; behaviour = log-prob gap)")
    _add_planted_options(planted, None)
    planted.set_defaults(func=_bench_planted)
    medical = bench.add_parser(
        "medical", help="the planted benchmark on the emergent-misalignment good/bad medical advice (paired)",
        description="bench planted with --paired on DATA/good_medical_advice.jsonl.gz (clean) and "
                    "DATA/bad_medical_advice.jsonl.gz (planted), read in place.")
    medical.add_argument("--data", default="../shared/data/em", help="folder with the two files (default ../shared/data/em)")
    _add_planted_options(medical, 0.1)
    medical.set_defaults(func=_bench_medical)

    speed = bench.add_parser("speed", help="cost per example of each estimator, factor fitting, memory, kronfluence, "
                                           "Bergson",
                             description="Measure in one run: tokens/s of a training step, of concept_influence "
                                         "scoring and of probe_projection; EK-FAC fitting time; peak memory; and "
                                         "scores and time against kronfluence and Bergson (both installed by `make "
                                         "install`). Writes DIR/speed.json and DIR/speed.md.")
    speed.add_argument("--out", required=True, help="output folder for speed.json and speed.md")
    speed.add_argument("--quick", action="store_true", help="a reduced size (about a minute)")
    speed.add_argument("--seed", type=int, default=0, help="seed for data, model and sampling (default 0)")
    speed.add_argument("--no-kronfluence", action="store_true", help="skip the kronfluence and Bergson comparison")
    speed.add_argument("--size", choices=("gpt2-small", "qwen-0.5b", "tiny"),
                       help="instead: every stage on a randomly initialised model of this shape, against the floor "
                            "(writes DIR/speed-SIZE.json and .md)")
    speed.add_argument("--examples", type=int, help="with --size: random training sequences (default 32)")
    speed.add_argument("--rounds", type=int,
                       help="with --size: runs of each compared K = 1 pipeline, median reported (default 3)")
    speed.set_defaults(func=_bench_speed)

    memory = bench.add_parser("memory", help="peak RSS of scoring 1k vs 50k examples (streamed, sharded)",
                              description="Score 1,000 and 50,000 examples of the embedded corpus with a small saved "
                                          "model through run folders (concept_influence and probe_projection), each "
                                          "`score` stage in its own process, and report its peak RSS and time. "
                                          "Writes DIR/memory.json and DIR/memory.md.")
    memory.add_argument("--out", required=True, help="output folder for memory.json and memory.md")
    memory.add_argument("--quick", action="store_true", help="200 vs 1,000 examples (a check that it runs)")
    memory.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    memory.add_argument("--seed", type=int, default=0, help="seed for the corpus and model (default 0)")
    memory.set_defaults(func=_bench_memory)
    add_concept_commands(sub, bench)  # concept check, filter, bench query-table (concept_influence/cli_concept.py)
    add_index_commands(sub, bench)  # index build, index query, bench index (concept_influence/cli_index.py)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input: printed as one line, exit status 2 (anything else is a bug: traceback)."""
    from probes.directions import DirectionError

    from .benchmarks.planted import BenchmarkError
    from .concepts import ConceptError
    from .config import ConfigError
    from .curvature import CurvatureError
    from .data import DataError
    from .models import HookError, ModelLoadError
    from .runs import RunError
    from .scoring import ScoringError

    return (DataError, BenchmarkError, ConfigError, RunError, ModelLoadError, HookError, DirectionError, ConceptError,
            CurvatureError, ScoringError, *user_errors(), *index_errors())


def main(argv: list[str] | None = None) -> int:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"concept-influence: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
