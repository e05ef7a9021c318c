"""``concept-influence retrieve``: the top k by an exact estimator with a certified recall, from a cheap first stage
(concept_influence/retrieval.py)."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path
from typing import Callable

__all__ = ["add_retrieve_command"]


def _column(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"a count (>= 1) or a fraction of N in (0, 1), got {text}")
    return value


def _learned_stage(args: argparse.Namespace, n_of: Callable[[int], tuple[int, int | None]]):
    """The ``text`` first stage: the run's kept chats, their TF-IDF features, and the ridge fitted on the exact
    scores of a uniform sample (``--learn-sample``, default :func:`default_sample`)."""
    import numpy as np

    from .retrieval import RetrievalError, default_budget, run_examples_scorer
    from .retrieval_learned import default_sample, fit_first_stage, text_features

    if args.run is None:
        raise RetrievalError("the text first stage reads the chats and scores them with a run folder: give --run")
    chats, scorer = run_examples_scorer(args.run, args.exact_column, progress=not args.no_progress)
    ids = [c.id for c in chats]
    k, budget = n_of(len(ids))
    budget = default_budget(len(ids), k) if budget is None else budget
    sample = args.learn_sample or default_sample(budget)
    if args.shortlist is not None and not args.single_fit:
        raise RetrievalError("--shortlist fixes M for the first fit's ranking; the text stage builds its shortlist in "
                             "rounds: add --single-fit to give M")
    rng = np.random.default_rng(args.seed)
    stage = fit_first_stage(text_features(chats), scorer, sample, seed=rng)
    options = dict(refine=False, shortlist=args.shortlist) if args.single_fit else {}
    result = stage.retrieve(scorer, k, args.delta, budget, design=args.design, strata=args.strata, target=args.target,
                            seed=rng, **options)
    rounds = "" if args.single_fit else (
        f" The shortlist was built in {len(stage.rounds)} rounds (score the best-predicted batch, refit on every exact "
        f"score so far): {', '.join(f'{above} of {size}' for size, above in stage.rounds)} above the k-th best found "
        f"before them.")
    note = (f"Learned first stage (`text`): a ridge regression (α = {stage.alpha:.3g}) from the chats' TF-IDF words "
            f"to the exact scores of a uniform sample of {sample}, which count in the budget as prescored examples; "
            f"held-out Spearman on the sample {stage.heldout_spearman:.2f}.{rounds}")
    return ids, stage.scores, result, note


def _retrieve(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from .fileio import atomic_write_text
    from .retrieval import RetrievalError, array_scorer, certified_retrieval, run_scorer
    from .scores import Scores

    def n_of(n: int) -> tuple[int, int | None]:
        k = math.ceil(args.k * n) if args.k < 1 else int(args.k)
        return k, None if args.budget is None else (math.ceil(args.budget * n) if args.budget < 1 else int(args.budget))

    note = ""
    run_source = f"the estimator of run {args.run}" + (" and the behaviour's own ranking (their union: each one's top k)"
                                                        if args.exact_column == "union" else "")
    if args.first_stage == "text":
        ids, values, result, note = _learned_stage(args, n_of)
        source = run_source
    else:
        first = Scores.load(args.first_stage)
        ids, values = first.ids, first.column(args.column)
        k, budget = n_of(len(first))
        if args.exact is not None:
            if args.exact_column == "union":
                raise RetrievalError("--exact-column union scores the behaviour's own ranking beside the run's: give "
                                     "--run")
            exact = Scores.load(args.exact)
            try:
                known = exact.aligned(first.ids)[:, exact.column_index(args.exact_column)]
            except KeyError as e:
                raise RetrievalError(f"--exact {args.exact}: {e.args[0]}") from None
            scorer, source = array_scorer(known), f"{args.exact} (column {args.exact_column})"
        else:
            scorer, source = run_scorer(args.run, first.ids, args.exact_column, progress=not args.no_progress), run_source
        result = certified_retrieval(values, scorer, k, args.delta, budget, shortlist=args.shortlist,
                                     design=args.design, strata=args.strata, target=args.target, seed=args.seed)
    n = len(ids)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    union = result.rankings > 1
    Scores([ids[i] for i in result.scored], result.exact, "exact", ["score", "behaviour"] if union else ["score"],
           {"retrieval": "exactly scored examples (prescored, shortlist, then sample)",
            "first_stage": str(args.first_stage),
            "exact": source}).save(out / "exact.safetensors")
    data = result.to_json() | {"ids": [ids[i] for i in result.top], "first_stage": str(args.first_stage),
                               "first_stage_column": args.column, "exact": source}
    atomic_write_text(out / "retrieval.json", json.dumps(data, indent=1))
    rows = [f"| rank | exact score{' (run / behaviour)' if union else ''} | id | first-stage rank |",
            "|---:|---:|---|---:|"]
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[np.argsort(-values, kind="stable")] = np.arange(n)
    rows += [f"| {r} | {' / '.join(f'{v:.6g}' for v in np.atleast_1d(s))} | {ids[i]} | {rank_of[i] + 1} |"
             for r, (i, s) in enumerate(zip(result.top, result.top_scores), start=1)]
    text = (f"# Certified retrieval\n\nFirst stage: `{args.first_stage}` (column {args.column}); exact: {source}.\n\n"
            + (note + "\n\n" if note else "")
            + result.report() + "\n\n## The top k found" + (" (the union of each ranking's top k, best rank first)"
                                                             if union else "") + "\n\n" + "\n".join(rows) + "\n")
    atomic_write_text(out / "retrieval.md", text)
    print(result.summary())
    print(out / "retrieval.md")
    return 0


def add_retrieve_command(sub) -> None:
    p = sub.add_parser(
        "retrieve", help="the top k by an exact estimator with certified recall, from a cheap first stage",
        description=textwrap.fill(
            "Score exactly the top M of FIRST_STAGE (a scores file: the fast path, an index query, any ranking; or "
            "`text`: a ridge regression from the words of the run's chats, fitted on the exact scores of a uniform "
            "sample that then counts as scored and refitted as the shortlist is scored in rounds) and a "
            "uniform random sample of the rest, return the top k by exact score and a lower bound on their recall of "
            "the true top k that holds with confidence 1 - delta (an exact hypergeometric bound on the unscored "
            "examples at or above the shortlist's k-th exact score). The exact scores come from a run folder's "
            "estimator (--run: only the chosen examples are scored) or a scores file (--exact). Writes "
            "OUT/retrieval.md (the statement, the budget, what more budget would buy, the top k), OUT/retrieval.json "
            "and OUT/exact.safetensors (every exact score computed).", 100))
    p.add_argument("first_stage", metavar="FIRST_STAGE",
                   help="first-stage scores (.safetensors, as `score` writes), or `text`: a ridge regression from the "
                        "run's chats' words to the exact scores of a uniform sample (--run; the sample counts in the "
                        "budget)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN", help="run folder whose scoring.estimator gives the exact scores")
    src.add_argument("--exact", metavar="SCORES", help="exact scores already computed for every example (a check)")
    p.add_argument("--k", type=_budget, required=True, help="how many to retrieve: a count, or a fraction of N below 1")
    p.add_argument("--delta", type=float, default=0.05, help="1 - confidence of the recall bound (default 0.05)")
    p.add_argument("--budget", type=_budget, help="exact scores to spend: a count, or a fraction of N (default 0.1)")
    p.add_argument("--shortlist", type=int, help="M, the first stage's top scored exactly (default: see "
                                                 "retrieval.default_split)")
    p.add_argument("--design", choices=("uniform", "stratified"), default="uniform",
                   help="the sample of the rest (default uniform; stratified by first-stage rank)")
    p.add_argument("--strata", type=int, help="strata of the stratified design (default 2)")
    p.add_argument("--target", type=float, default=0.95, help="the recall the default split aims to certify")
    p.add_argument("--column", type=_column, default=0, help="first-stage column (index or name; default 0)")
    p.add_argument("--exact-column", type=_column, default=0,
                   help="exact column (index or name; default 0); with --run, `union`: the run's scores and the "
                        "behaviour's own ranking at once (the union the run answers with: each one's top k)")
    p.add_argument("--learn-sample", type=int, help="the text first stage's sample of exact scores (default: 10 %% of "
                                                    "the budget)")
    p.add_argument("--single-fit", action="store_true",
                   help="text first stage: shortlist the first fit's top M at once instead of in refitted rounds")
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples (default 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_retrieve)
