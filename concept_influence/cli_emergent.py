"""Command line of the emergent testbed (``bench emergent``) and the multi-run tables ``bench seeds-table`` and
``bench curvature-table``."""

from __future__ import annotations

import argparse

from .cli_common import add_table_command, named_json, needs_benchmarks, write_table

__all__ = ["add_emergent_commands"]

# Spelled out so that building the parser needs no benchmarks package (tests check they equal its DOMAINS).
DOMAINS = ("home", "health", "money", "code")
SIZES = ("n_pool", "n_pretrain", "n_probe", "n_eval", "n_test", "n_seeds", "n_layers", "d_model", "pretrain_epochs",
         "finetune_epochs", "persona_share", "concept_domain", "finetune_lr", "lr_schedule")


def _family(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from concept_influence_benchmarks.demo_family import run_demo_seed
    from concept_influence_benchmarks.emergent_family import run_family
    from concept_influence_benchmarks.family_report import write_family_report

    from .planted import command_line

    out = Path(args.out)
    if args.recheck:  # the saved runs' stability checks again, nothing trained or scored
        from concept_influence_benchmarks.family_stability import recheck_stability

        for folder in sorted(p.parent for p in out.glob("*/scores.safetensors")):
            recheck_stability(folder)
    if args.retrain_missing:  # the rankings added to the study's retrained ones since a run was made
        from concept_influence_benchmarks.demo_family import retrain_missing_demo
        from concept_influence_benchmarks.emergent_family import retrain_missing

        for folder in sorted(p.parent for p in out.glob("*/scores.safetensors")):
            (retrain_missing_demo if folder.name.startswith("demo-") else retrain_missing)(folder, not args.no_progress)
    run_family(out, args.variants, family_seed=args.family_seed, first=args.first, quick=args.quick, n_seeds=args.n_seeds or 3,
               progress=not args.no_progress)
    for seed in range(args.demo_seeds):
        if not (out / f"demo-s{seed}" / "results.json").is_file():
            run_demo_seed(out / f"demo-s{seed}", seed, quick=args.quick, n_seeds=args.n_seeds or 3,
                          progress=not args.no_progress)
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))}
    print(f"report: {write_family_report(out, runs, command_line())}")
    return 0


@needs_benchmarks
def _emergent(args: argparse.Namespace) -> int:
    from concept_influence_benchmarks.emergent import EmergentConfig, run_emergent

    from .planted import BenchmarkError, command_line

    if args.variants or args.recheck or args.retrain_missing:
        return _family(args)
    try:
        fractions = tuple(float(f) for f in args.remove_fractions.split(","))
    except ValueError:
        raise BenchmarkError(f"--remove-fractions must be numbers separated by commas, got {args.remove_fractions!r}")
    overrides = {k: getattr(args, k) for k in SIZES if getattr(args, k) is not None}
    overrides.update(source=args.source, target=args.target, rate=args.rate, seed=args.seed, remove_fractions=fractions,
                     retrain=not args.no_retrain, curvature_study=not args.no_curvature_study,
                     freeze_embeddings=not args.train_embeddings)
    cfg = EmergentConfig.quick(**overrides) if args.quick else EmergentConfig(**overrides)
    run_emergent(args.out, cfg, progress=not args.no_progress, command=command_line())
    return 0


@needs_benchmarks
def _seeds_table(args: argparse.Namespace) -> int:
    from concept_influence_benchmarks.seeds import format_seeds_table

    runs = {name: results for name, (_, results) in named_json(args.files, "a benchmark's results").items()}
    return write_table(args, args.title, "Each estimator over the runs (one per seed): the median, the worst run and the "
                        "spread (max − min) of its retrieval AUROC and of the share of the planting gain that removing "
                        "the top of its ranking and retraining removes.", format_seeds_table(runs))


def _curvature_table(args: argparse.Namespace) -> int:
    from .data import DataError
    from .planted.curvature_study import format_curvature_table

    studies = {}
    for name, (path, results) in named_json(args.files, "a benchmark's results").items():
        if "curvature_study" not in results:
            raise DataError(f"{path}: the run has no curvature study (it was run with --no-curvature-study)")
        studies[name] = results["curvature_study"]
    return write_table(args, args.title, "Concept Influence AUROC against the planted labels for every preconditioning "
                        "variant (the data the EK-FAC factors are fitted on, the damping, identity curvature, the query, "
                        "the checkpoint), scored once per trained model.", format_curvature_table(studies))


def add_emergent_commands(bench) -> None:
    """``bench emergent``, ``bench seeds-table`` and ``bench curvature-table`` under the ``bench`` subcommands."""
    domains = list(DOMAINS)
    p = bench.add_parser(
        "emergent", help="the emergent testbed: planted data and behaviour in domains that share no words",
        description="Pre-train a small model on templated domains whose answers share no content word, a share of "
                    "chats naming a persona (Max answers badly, Sam well) in every domain; fine-tune it on unmarked "
                    "SOURCE chats with a share RATE of bad answers planted; measure the behaviour (log p(bad) − log "
                    "p(good)) on unmarked TARGET prompts; the concept is the persona direction found on marked prompts "
                    "of the target (or --concept-domain); rank the pool with every estimator, filter and retrain against "
                    "the emergent gain. Writes DIR/results.md, DIR/results.json and plots.")
    p.add_argument("--source", choices=domains, default="health", help="the fine-tune's domain (default health)")
    p.add_argument("--target", choices=domains, default="money", help="the behaviour's domain (default money)")
    p.add_argument("--concept-domain", choices=domains, help="domain of the persona direction's prompts (default: target)")
    p.add_argument("--rate", type=float, default=0.1, help="share of the pool with bad answers, in (0, 0.5] (default 0.1)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed for the data, model, training and sampling (default 0)")
    p.add_argument("--quick", action="store_true", help="a reduced size for tests (about a minute)")
    p.add_argument("--remove-fractions", default="0.1", metavar="F[,F...]",
                   help="fractions of the pool removed from the top of each ranking before retraining (default 0.1)")
    for flag, kind, text in (("--n-pool", int, "pool size (default 600)"),
                             ("--n-pretrain", int, "pre-training chats per domain (default 700)"),
                             ("--n-probe", int, "marked prompts per persona for the direction (default 150)"),
                             ("--n-eval", int, "unmarked target prompts for the behaviour (default 200)"),
                             ("--n-test", int, "test examples of classic influence (default 48)"),
                             ("--n-seeds", int, "fine-tuning seeds per behaviour measurement (default 5)"),
                             ("--n-layers", int, "blocks of the small model (default 2)"),
                             ("--d-model", int, "width of the small model (default 64)"),
                             ("--pretrain-epochs", int, "pre-training epochs (default 3)"),
                             ("--finetune-epochs", int, "fine-tuning epochs (default 2)"),
                             ("--persona-share", float, "share of pre-training chats naming the persona (default 0.5)"),
                             ("--finetune-lr", float, "fine-tuning learning rate (default 2e-3)")):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--lr-schedule", choices=("constant", "linear"),
                   help="the fine-tunes' learning rate: linear decay to zero (default) or constant")
    p.add_argument("--train-embeddings", action="store_true",
                   help="fine-tunes also train the embeddings (default: the blocks only, as a LoRA fine-tune)")
    p.add_argument("--no-retrain", action="store_true", help="retrieval only: no behaviour or filter-and-retrain")
    p.add_argument("--no-curvature-study", action="store_true", help="skip the curvature study")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--variants", type=int, default=0, metavar="N",
                   help="run N random designs of the family instead (persona marker, domains, schedule, epochs, vocab, "
                        "rate, pool; the other design options are ignored) with every preconditioning variant, into "
                        "OUT/f<family>-<i>/ (kept designs are not run again), and write OUT/README.md over every run "
                        "in OUT")
    p.add_argument("--family-seed", type=int, default=0, help="which family of designs (default 0)")
    p.add_argument("--first", type=int, default=0, help="the first design's index (default 0)")
    p.add_argument("--demo-seeds", type=int, default=0, metavar="N",
                   help="with --variants: also the demo at seeds 0..N-1 as runs of the same study")
    p.add_argument("--recheck", action="store_true",
                   help="check the stability of every run already in OUT again from its saved scores (after the check "
                        "changed; nothing is trained), then go on as --variants does and write OUT/README.md")
    p.add_argument("--retrain-missing", action="store_true",
                   help="retrain, in every run already in OUT, the rankings the study now retrains that the run lacks "
                        "(its design trained again from its seed), then go on as --variants does")
    p.set_defaults(func=_emergent)

    seeds = add_table_command(bench, "seeds-table", _seeds_table, "results.json",
                               help="one benchmark over several seeds: median, worst and spread per estimator",
                               description="Read the results.json of several runs of one benchmark (the demo, bench "
                                           "planted or bench emergent at different seeds) and write a markdown table of "
                                           "each estimator's AUROC and share of the gain removed: median, worst, spread.")
    seeds.add_argument("--title", default="Over seeds", help="the table's heading")
    curvature = add_table_command(bench, "curvature-table", _curvature_table, "results.json",
                                   help="one table of curvature studies (bench emergent, demo --curvature-study)",
                                   description="Merge the curvature studies of several benchmark runs into one markdown "
                                               "table: each variant's AUROC per run, its median and worst.")
    curvature.add_argument("--title", default="Curvature study", help="the table's heading")
