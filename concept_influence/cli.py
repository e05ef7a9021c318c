"""Command line: ``concept-influence demo``, ``bench planted``, ``bench medical`` and ``bench speed``."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


PLANTED_SIZES = ("n_probe", "n_pretrain", "n_pool", "n_eval", "n_seeds", "n_layers", "d_model", "max_length", "layer",
                 "finetune_epochs", "pretrain_epochs")


def _demo(args: argparse.Namespace) -> int:
    from .benchmarks.planted import command_line
    from .demo import demo_config, run_demo

    run_demo(args.out, demo_config(args.quick, args.seed), progress=not args.no_progress, command=command_line())
    return 0


def _planted_config(args: argparse.Namespace, paired: bool):
    from .benchmarks.planted import BenchmarkError, PlantedConfig

    overrides = {k: getattr(args, k) for k in PLANTED_SIZES if getattr(args, k) is not None}
    try:
        fractions = tuple(float(f) for f in args.remove_fractions.split(","))
    except ValueError:
        raise BenchmarkError(f"--remove-fractions must be numbers separated by commas, got {args.remove_fractions!r}")
    overrides.update(rate=args.rate, paired=paired, seed=args.seed, lds=args.lds, remove_fractions=fractions)
    return PlantedConfig.quick(**overrides) if args.quick else PlantedConfig(**overrides)


def _run_planted(args: argparse.Namespace, clean, planted, paired: bool, names: tuple[str, str]) -> int:
    from .benchmarks.planted import command_line, run_planted
    from .data import load_chat_jsonl

    cfg = _planted_config(args, paired)
    run_planted(load_chat_jsonl(clean), load_chat_jsonl(planted), args.out, cfg, progress=not args.no_progress,
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
                   help="concept-LDS: fine-tune on M random halves of the pool (default 0: skip)")
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
    p.add_argument("--layer", type=int, help="block of the probe (default: the middle block)")
    p.add_argument("--pretrain-epochs", type=int, help="pre-training epochs (default 2)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _bench_speed(args: argparse.Namespace) -> int:
    from .benchmarks.speed import run_speed_benchmark

    run_speed_benchmark(args.out, quick=args.quick, seed=args.seed, kronfluence=not args.no_kronfluence)
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
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (the log lines and the table are still printed)")
    demo.set_defaults(func=_demo)

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

    speed = bench.add_parser("speed", help="cost per example of each estimator, factor fitting, memory, kronfluence",
                             description="Measure in one run: tokens/s of a training step, of concept_influence "
                                         "scoring and of probe_projection; EK-FAC fitting time; peak memory; and "
                                         "scores and time against kronfluence (installed by `make install`). "
                                         "Writes DIR/speed.json and DIR/speed.md.")
    speed.add_argument("--out", required=True, help="output folder for speed.json and speed.md")
    speed.add_argument("--quick", action="store_true", help="a reduced size (about a minute)")
    speed.add_argument("--seed", type=int, default=0, help="seed for data, model and sampling (default 0)")
    speed.add_argument("--no-kronfluence", action="store_true", help="skip the kronfluence comparison")
    speed.set_defaults(func=_bench_speed)
    return parser


def main(argv: list[str] | None = None) -> int:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from .benchmarks.planted import BenchmarkError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, BenchmarkError) as e:
        print(f"concept-influence: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
