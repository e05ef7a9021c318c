"""Command line of the gradient index: ``index build``, ``index query`` and ``bench index``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import EM_DATA, add_settings_options, given_settings, needs_benchmarks
from .concept_spec import ConceptSpec
from .index.store import STORAGE_DTYPES
from .index.subspace import PROJECTIONS, QUERY_CURVATURES

__all__ = ["add_index_commands"]


def _build(args: argparse.Namespace) -> int:
    import os

    from .index import IndexSettings
    from .index.from_runs import build_from_runs

    settings = IndexSettings(projection=args.projection, rank=args.rank, budget=args.budget, dtype=args.dtype,
                             shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed)
    index = build_from_runs(args.sources, args.out, settings, args.weights, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        entries = index.checkpoints
        print(f"{args.out}: {entries[0]['n_examples']} examples x {len(entries)} checkpoint(s), "
              f"{index.bytes_per_example} bytes per example and checkpoint ({len(index.maps)} maps, "
              f"{settings.projection} projection, rank {index.store.manifest['rank']}, {settings.dtype})")
    return 0


def _tokenized(path: str, adapter, max_length: int, limit: int | None) -> list:
    from .cli_common import read_examples

    return read_examples([path], adapter, max_length)[:limit]


def _estimator(args: argparse.Namespace, index, adapter, run):
    """The query as a gradient estimator: the concept of the options (:class:`~.concept_spec.ConceptSpec`), each option
    not given taken from the first run's ``[concept]`` (a concept named by options replaces the run's own)."""
    from .concept_spec import CONCEPT_TYPES, query_estimator

    given = given_settings(args, ConceptSpec)
    naming = {name for t in CONCEPT_TYPES.values() for name in t.needs}  # the fields that say which concept
    spec = run.concept_spec.project(ConceptSpec)
    if naming & set(given):
        spec = spec.replace(**dict.fromkeys(naming))
    spec = spec.replace(**given)
    max_length = run.config.data.max_length
    return query_estimator(spec, adapter, lambda path, limit: _tokenized(path, adapter, max_length, limit),
                           preconditioned=args.curvature != "identity", loss_tokens=index.settings.loss_tokens)


def _query(args: argparse.Namespace) -> int:
    from .data import DataError
    from .index import GradientIndex
    from .index.from_runs import checkpoint_models, checkpoint_run

    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"{out} exists; give --force to replace it")
    index = GradientIndex(args.index)
    run = checkpoint_run(index, 0)
    adapters = checkpoint_models(index)
    estimator = _estimator(args, index, adapters[0], run)
    scores = index.score(estimator, adapters, curvature=args.curvature, batch_size=args.batch_size,
                         progress=not args.no_progress)
    scores.save(out)
    print(f"{out}: {scores.estimator} of {len(scores)} examples for {len(scores.columns)} column(s) "
          f"({', '.join(scores.columns[:5])}{', ...' if len(scores.columns) > 5 else ''})")
    if args.report:
        from .index.concept_map import concept_map, write_concept_report

        texts = index.texts(concept_map(scores, args.top).ids)  # (the scores are saved first)
        print(write_concept_report(scores, args.report, texts, args.top))
    return 0


@needs_benchmarks
def _bench(args: argparse.Namespace) -> int:
    from concept_influence_benchmarks.index_bench import IndexBenchConfig, run_index_benchmark

    given = {k: v for k, v in (("n_examples", args.examples), ("seeds", args.seeds)) if v is not None}
    cfg = IndexBenchConfig(size=args.size, quick=args.quick, bergson=not args.no_bergson, **given)
    if args.part == "medical":
        from concept_influence_benchmarks.index_bench_medical import run_index_medical

        run_index_medical(args.out, args.data, cfg)
    else:
        run_index_benchmark(args.out, cfg)
    return 0


def add_index_commands(sub, bench) -> None:
    """``index build``, ``index query`` and ``bench index``."""
    index = sub.add_parser("index", help="a compressed gradient index: build once, query many concepts").add_subparsers(
        dest="index_command", required=True)
    build = index.add_parser(
        "build", help="index the training data's projected gradients (resumable, torchrun)",
        description="One forward+backward pass per checkpoint over the training data of each run (a run folder, or a "
                    "run config: its folder is made or resumed), storing each example's gradient projected per linear "
                    "map (the maps of the run's factors, blocks up to the probe's) in shards under OUT. The run's probe "
                    "and factors stages run first where they have not. Several runs (e.g. the base and the fine-tuned "
                    "model, same data) are the index's checkpoints, summed by every query. Starting the same command "
                    "again resumes at the first missing shard; under torchrun the shards are shared between processes.")
    build.add_argument("sources", nargs="+", metavar="RUN_OR_CONFIG", help="run folders or run configs, one per checkpoint")
    build.add_argument("--out", required=True, help="the index folder (outside the run folders)")
    build.add_argument("--projection", choices=PROJECTIONS, default="eigen",
                       help="eigen: top EK-FAC eigenvectors (default); random: LoGra; identity: uncompressed (takes "
                            "any curvature, e.g. a run's [factors] strategy = \"adam_state\")")
    build.add_argument("--rank", type=int, help="dimensions per side of each map (default: the largest that fits in "
                                                "--budget)")
    build.add_argument("--budget", type=int, default=65536,
                       help="bytes per example and checkpoint, when --rank is not given (default 65536)")
    build.add_argument("--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype (default float16)")
    build.add_argument("--shard-size", type=int, default=1024, help="examples per shard file (default 1024)")
    build.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward (default 8)")
    build.add_argument("--seed", type=int, default=0, help="seed of the random projection (default 0)")
    build.add_argument("--weights", type=float, nargs="+", help="one weight per checkpoint in query sums (default 1)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    query = index.add_parser(
        "query", help="score every indexed example for concepts or test examples (writes a scores file)",
        description="Compute the query's gradient on its own texts at each checkpoint, project and precondition it "
                    "in the index's spaces, and score every indexed example (summed over checkpoints). The query: K "
                    "concept directions at one hook (--directions), K SAE latents (--sae, --latents), or test "
                    "examples (--test: classic influence on their loss); an option not given is the first run's "
                    "[concept] (by default its probe and evaluation texts). Writes OUT (the scores file `score` "
                    "writes: filter and sum-scores read it).")
    query.add_argument("index", metavar="INDEX", help="the index folder")
    query.add_argument("--out", required=True, help="scores file to write (.safetensors + .json)")
    add_settings_options(query, ConceptSpec)
    query.add_argument("--curvature", choices=QUERY_CURVATURES, default="ekfac",
                       help="ekfac: the run's curvature in the projected space (default; EK-FAC, or the run's "
                            "[factors] strategy with the identity projection); empirical: fitted on the stored rows; "
                            "identity: gradient dot products")
    query.add_argument("--report", metavar="DIR", help="also write DIR/report.md and DIR/concept_map.png: the concept "
                                                       "x data map and each concept's top examples")
    query.add_argument("--top", type=int, default=5, help="with --report: top examples per concept (default 5)")
    query.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward of the query (default 8)")
    query.add_argument("--force", action="store_true", help="replace OUT if it exists")
    query.add_argument("--no-progress", action="store_true", help="no progress bars")
    query.set_defaults(func=_query)

    b = bench.add_parser(
        "index", help="the gradient index against exact scoring and Bergson's index (size, time, accuracy)",
        description="At GPT-2-small shape (random weights) and on the demo: bytes per example of each projection at "
                    "equal bytes, build time against one exact scoring pass, query time for K = 1 and 100 over 10k and "
                    "100k stored rows, Spearman and planted AUROC against exact Concept Influence and classic "
                    "influence, and Bergson's index at the same compression. Writes DIR/index.json and DIR/index.md. "
                    "With --part medical, only the projections against the exact estimators on the medical benchmark "
                    "(DIR/index-medical.json and .md).")
    b.add_argument("--out", required=True, help="output folder for index.json and index.md (or index-medical.*)")
    b.add_argument("--part", choices=("main", "medical"), default="main",
                   help="main: GPT-2 shape, query time and the demo (default); medical: instead, every projection at "
                        "equal bytes on the medical benchmark (bench medical's data, training and concept), written "
                        "to DIR/index-medical.json and .md")
    b.add_argument("--data", default=EM_DATA, help=f"with --part medical: bench medical's --data (default {EM_DATA})")
    b.add_argument("--size", choices=("gpt2-small", "tiny"), default="gpt2-small", help="the random model's shape")
    b.add_argument("--examples", type=int, help="training sequences at that shape (default 48)")
    b.add_argument("--seeds", type=int, help="demo (or medical) seeds (default 5); those an earlier report in --out "
                                             "holds, made with the same settings, are kept")
    b.add_argument("--quick", action="store_true", help="a reduced size (a check that it runs)")
    b.add_argument("--no-bergson", action="store_true", help="skip Bergson's index")
    b.set_defaults(func=_bench)
