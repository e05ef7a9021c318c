"""Command line for judging and acting on a concept: ``concept check`` (is it causal?), ``filter`` (remove the top
of a ranking from a training file), the planted benchmarks' query options and ``bench query-table``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from probes import PROBE_KINDS, REDUCTIONS

from .cli_common import (
    add_dtype_option,
    add_settings_options,
    add_table_command,
    given_settings,
    named_json,
    read_examples,
    read_scores,
    write_table,
)
from .concept_check import STEERING_POSITIONS
from .concept_spec import ConceptSpec

__all__ = ["add_concept_commands", "add_query_options", "query_overrides"]

#: The fields of a concept specification that name what ``concept check`` steers along.
CHECKED = ("directions", "sae", "latents", "hook")


def _floats(text: str, option: str) -> tuple[float, ...]:
    from .concept_check import ConceptCheckError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConceptCheckError(f"{option} must be numbers separated by commas, got {text!r}") from None


def _read(path: str, option: str, adapter, args: argparse.Namespace) -> list:
    """The first ``--max-examples`` tokenised chats of ``path`` (given as ``option``); an error names the option and
    the file when none can be used."""
    from .concept_check import ConceptCheckError
    from .data import DataError

    try:
        examples = read_examples([path], adapter, args.max_length)[: args.max_examples]
    except DataError as e:
        raise ConceptCheckError(f"{option}: {e}") from None
    if not examples:
        raise ConceptCheckError(f"{option}: {path}: no example to read (--max-examples {args.max_examples})")
    return examples


def _concept_check(args: argparse.Namespace) -> int:
    from .concept_check import check_concept_files
    from .concept_spec import steering_direction
    from .models import load_model

    spec = ConceptSpec(**given_settings(args, ConceptSpec, CHECKED))
    adapter = load_model(args.model, dtype=args.dtype)
    direction = steering_direction(spec, adapter)
    positions = tuple(p for p in args.positions.split(",") if p)
    check_concept_files(adapter, direction, args.positive, args.negative,
                        lambda path, key: _read(path, key, adapter, args),
                        args.out, ("--positive", "--negative"),
                        {"model": str(args.model), "concept": {k: v for k, v in spec.to_dict().items() if k in CHECKED}},
                        alphas=_floats(args.alphas, "--alphas"), positions=positions, threshold=args.threshold,
                        batch_size=args.batch_size)
    if args.out:
        print(f"written: {Path(args.out) / 'concept_check.json'}, {Path(args.out) / 'concept_check.png'}")
    return 0


def _filter(args: argparse.Namespace) -> int:
    from .filtering import filter_training_file, sidecar_path

    column: int | str = int(args.column) if args.column.isdigit() else args.column
    record = filter_training_file(args.scores, args.data, args.out, remove_top=args.remove_top,
                                  keep_bottom=args.keep_bottom, column=column, overwrite=args.force)
    print(f"removed {record['removed']} of {record['examples']} examples ({record['scores']['estimator']}, column "
          f"{record['scores']['column']}); kept {record['kept']} in {args.out}"
          + (f" ({record['unscored_kept']} had no score and were kept)" if record["unscored_kept"] else "")
          + f"\nrecord: {sidecar_path(args.out)}")
    return 0


def _sum_scores(args: argparse.Namespace) -> int:
    from .data import DataError
    from .scores import Scores

    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"{out} exists; give --force to replace it")
    parts = []
    for path in args.scores:
        parts.append(read_scores(path))
    try:
        total = Scores.weighted_sum(parts, args.weights, estimator=args.estimator or f"{parts[0].estimator}[checkpoints]",
                                    metadata={**parts[0].metadata, "summed": list(args.scores),
                                              "weights": args.weights or [1.0] * len(parts)})
    except ValueError as e:
        raise DataError(f"cannot sum {', '.join(args.scores)}: {e}") from None
    total.save(out)
    print(f"{out}: the sum of {len(parts)} score files ({len(total)} examples, {total.estimator})")
    return 0


def _amount(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a count, got {text!r}") from None
    return int(value) if value >= 1 and value == int(value) else value


def _query_table(args: argparse.Namespace) -> int:
    from .planted.query_study import format_query_table

    studies, verdicts = {}, {}
    for name, (path, study) in named_json(args.files, "a query study").items():
        studies[name] = study
        results = path.parent / "results.json"  # the benchmark run's report: the steering check's verdict
        if results.is_file():
            check = json.loads(results.read_text()).get("concept_check")
            if check:
                verdicts[name] = check["verdict"]
    return write_table(args, "Query study",
                        "AUROC / AUPRC of Concept Influence against the planted labels for every variant, scored on one "
                        "trained model per benchmark and seed (in brackets: the verdict of the steering check of the "
                        "benchmark's probe, from the run's results.json).", format_query_table(studies, verdicts))


def _check_table(args: argparse.Namespace) -> int:
    from .data import DataError
    from .planted.experiment_report import format_check_table

    runs = {}
    for name, (path, results) in named_json(args.files, "a benchmark's results").items():
        if not results.get("concept_check"):
            raise DataError(f"{path}: the run has no concept check (it was run with --no-concept-check)")
        runs[name] = results
    return write_table(args, args.title,
                        "The steering check of each run's probe (first-order effect on log p(planted) − log p(clean answer) "
                        "per σ of the projection, ± its standard error; causal at ≥ 0.01 and two standard errors) beside "
                        "the retrieval AUROC of Concept Influence and of the fast path. Each run's command is at the top "
                        "of its results.md.", format_check_table(runs))


def add_concept_commands(sub, bench) -> None:
    """``concept check``, ``filter``, ``sum-scores``, ``bench check-table`` and ``bench query-table``."""
    concept = sub.add_parser("concept", help="judge a concept before attributing").add_subparsers(
        dest="concept_command", required=True)
    check = concept.add_parser(
        "check", help="is the concept causal for the behaviour? (separation + steering)",
        description="Separation of held-out positive vs negative examples by the direction, and the effect of "
                    "steering along it (adding alpha * sd * v at its hook) on log p(positive) - log p(negative) "
                    "answers; the verdict (causal, weak, reversed) judges the first-order effect at the smallest step.")
    check.add_argument("--model", required=True, help="model folder (concept-influence or Hugging Face format)")
    add_settings_options(check, ConceptSpec, CHECKED)
    check.add_argument("--positive", required=True, help="chat JSONL of answers that show the behaviour")
    check.add_argument("--negative", required=True, help="chat JSONL of answers that do not (same prompts if paired)")
    check.add_argument("--max-examples", type=int, default=200, help="examples read from each file (default 200)")
    check.add_argument("--max-length", type=int, help="tokens per example (default: the model's context length)")
    check.add_argument("--alphas", default="-4,-2,-1,-0.5,0.5,1,2,4",
                       help="steps in standard deviations of the projection (default -4,-2,-1,-0.5,0.5,1,2,4)")
    check.add_argument("--positions", default="all,prompt",
                       help=f"where to steer, of {', '.join(STEERING_POSITIONS)} (default all,prompt)")
    check.add_argument("--threshold", type=float, default=0.01,
                       help="first-order effect (nats per sd) needed for 'causal' (default 0.01; see the README)")
    check.add_argument("--batch-size", type=int, default=16, help="examples per forward (default 16)")
    check.add_argument("--out", help="folder for concept_check.json and concept_check.png")
    add_dtype_option(check)
    check.set_defaults(func=_concept_check)

    flt = sub.add_parser(
        "filter", help="remove the top of a ranking from a training file",
        description="Write OUT: the records of DATA minus the highest-scored examples of SCORES, unchanged; and "
                    "OUT.filter.json, the record of what was removed (ids, scores, ranks), why and from which inputs. "
                    "Scores must come from DATA (ids are <file name>:<line>, or <name>:<row> for tables). OUT's name "
                    "picks its format: a JSONL DATA keeps its lines (gzipped for .gz); a Parquet, Arrow or saved "
                    "dataset DATA keeps every column as .parquet or .arrow, or its chat columns as JSONL.")
    flt.add_argument("scores", metavar="SCORES", help="scores file (e.g. RUN/scores/scores.safetensors)")
    flt.add_argument("data", metavar="DATA", help="the training file that was scored")
    flt.add_argument("out", metavar="OUT", help="the filtered training file to write (.jsonl, .jsonl.gz, .parquet or .arrow)")
    rule = flt.add_mutually_exclusive_group(required=True)
    rule.add_argument("--remove-top", type=_amount, metavar="X", help="remove this fraction (0-1) or count from the top")
    rule.add_argument("--keep-bottom", type=_amount, metavar="X", help="keep only this fraction or count from the bottom")
    flt.add_argument("--column", default="0", help="score column, by index or name (default 0)")
    flt.add_argument("--force", action="store_true", help="replace OUT if it exists")
    flt.set_defaults(func=_filter)

    total = sub.add_parser(
        "sum-scores", help="add score files, e.g. one estimator's scores at several checkpoints",
        description="Write OUT (scores file + .json sidecar): the weighted sum of SCORES files over the same examples "
                    "and columns, e.g. a run scored at the base model and at the fine-tuned model with the same concept "
                    "direction (Concept Influence summed over checkpoints; see the README).")
    total.add_argument("out", metavar="OUT", help="scores file to write (.safetensors)")
    total.add_argument("scores", nargs="+", metavar="SCORES", help="scores files (e.g. RUN/scores/scores.safetensors)")
    total.add_argument("--weights", type=float, nargs="+", help="one multiplier per file (default 1 each)")
    total.add_argument("--estimator", help="the summed scores' estimator name (default: the first's + [checkpoints])")
    total.add_argument("--force", action="store_true", help="replace OUT if it exists")
    total.set_defaults(func=_sum_scores)

    checks = add_table_command(bench, "check-table", _check_table, "results.json",
                                help="one table of benchmark runs' concept checks",
                                description="The steering check and the retrieval AUROC of several benchmark runs "
                                            "(their results.json), one row each: where is the concept causal?")
    checks.add_argument("--title", default="Concept checks", help="the table's heading")
    add_table_command(bench, "query-table", _query_table, "query_study.json",
                       help="one table of query studies (bench ... --query-study)",
                       description="Merge the query_study.json files of several benchmark runs into one markdown table "
                                   "(AUROC / AUPRC of every variant per run, summaries by factor).")


def add_query_options(p: argparse.ArgumentParser) -> None:
    """The planted benchmarks' options for the concept query, the query study, the check and the LDS seeds."""
    p.add_argument("--probe-kind", choices=PROBE_KINDS, default="diff_means",
                   help="the concept's probe: difference of means (default) or logistic regression")
    p.add_argument("--query", choices=REDUCTIONS, default="last_prompt",
                   help="where Concept Influence reads the concept on the evaluation prompts (default last_prompt)")
    p.add_argument("--compare-query", choices=(*REDUCTIONS, "none"), default="response_mean",
                   help="also score and retrain concept_influence with this query (default response_mean; none: skip)")
    p.add_argument("--query-study", action="store_true",
                   help="also score every query variant on the trained model (query_study.json)")
    p.add_argument("--curvature-study", action="store_true",
                   help="also score every preconditioning variant of Concept Influence (factor data, damping, checkpoint)")
    p.add_argument("--no-concept-check", action="store_true", help="skip steering along the probe direction")
    p.add_argument("--lds-seeds", type=int,
                   help="fine-tuning seeds per concept-LDS subset (default 2; the demo's 4)")
    p.add_argument("--lds-fraction", type=float,
                   help="share of the pool in each concept-LDS subset (default 0.5; the demo's 0.25)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="skip concept_influence[checkpoints] and concept_grad_dot[checkpoints] (summed over the "
                        "pre-trained and the fine-tuned model)")


def query_overrides(args: argparse.Namespace) -> dict:
    """PlantedConfig fields from :func:`add_query_options`."""
    return {"probe_kind": args.probe_kind, "query": args.query,
            "compare_query": None if args.compare_query == "none" else args.compare_query,
            "query_study": args.query_study, "curvature_study": args.curvature_study, "concept_check": not args.no_concept_check,
            "over_checkpoints": not args.no_checkpoints,
            **{k: v for k in ("lds_seeds", "lds_fraction") if (v := getattr(args, k)) is not None}}
