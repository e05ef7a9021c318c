"""The learned first stage (concept_influence/retrieval_learned.py) on real pools whose exact scores are all known:
certified recall, true recall and coverage at 10 % of N (``--budget-share``) in exact scores **end to end** (the
learned stage's sample counts in the budget; its features and fit are timed against exact scoring of all N), over
repetitions that each draw a new training sample and a new retrieval sample (issue 28, criterion 2).

Pools: folders written by ``benchmarks/retrieval_large_pool.py`` (any ``--design``); the chats are rebuilt from
their ``pool.json`` and checked against the score file's ids. Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/retrieval_learned.py runs/retrieval-pool-20k runs/retrieval-emergent-20k \\
        runs/retrieval-emergent-80k > benchmarks/retrieval-learned.md

``--union``: instead, pools with ``scores/behaviour.safetensors`` (``retrieval_large_pool.py --design emergent
--behaviour``) are retrieved as the union a run answers with: the exact scores are two rankings (Concept Influence and the
behaviour's own), the answer is the union of each one's top k, recall is of the true union, the learned stage fits
one ridge output per ranking; the library's default variant only. ``--default``: the default variant only (one
ranking). ``--rankings``: no retrieval; a table of each such pool's two rankings (their
Spearman, the union of each one's top 1 %, each one's planted AUROC from labels rebuilt with the pool's seed).
``--budget-share S``: exact scores for S·N instead of 10 % (``0.09`` leaves the learned stage's own ~1 % inside a
strict 10 % end to end). ``--limits``: no pool; what a perfect free first stage certifies at 10 % end to end, by N and
by the first stage's own cost. A pool
built with ``--source`` holds the recommended estimator's rankings (SOURCE and the behaviour's, each over the
fine-tune's checkpoints), read the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from concept_influence.evaluation import retrieval_metrics  # noqa: E402
from concept_influence.retrieval import array_scorer, best_certifiable, default_split, union_top  # noqa: E402
from concept_influence.retrieval_learned import (  # noqa: E402
    REFINE_STOP,
    fit_first_stage,
    text_features,
)
from concept_influence.runs.stability import run_stability  # noqa: E402
from concept_influence.scores import Scores  # noqa: E402
from concept_influence_benchmarks.retrieval_pools import pool_examples, pool_planted  # noqa: E402

#: (label, the learned stage's sample as a share of the budget, refine, batch as a share of k, stop): the library's
#: defaults first (``default_sample``, k/4, ``REFINE_STOP``), then the single fit of the last version and the
#: refinement's settings one at a time
VARIANTS = (("refined", 0.1, True, 0.25, REFINE_STOP),
            ("single fit", 0.1, False, None, None),
            ("single fit", 0.3, False, None, None),
            ("refined, sample 5 %", 0.05, True, 0.25, REFINE_STOP),
            ("refined, sample 20 %", 0.2, True, 0.25, REFINE_STOP),
            ("refined, batch k/2", 0.1, True, 0.5, REFINE_STOP),
            ("refined, stop 0.02", 0.1, True, 0.25, 0.02))


def exact_seconds(folder: Path, n: int) -> float:
    """Seconds the pool builder spent scoring all N exactly (``seconds.json`` or the demo's results)."""
    if (folder / "seconds.json").exists():
        return json.loads((folder / "seconds.json").read_text())["exact scoring"]
    return json.loads((folder / "results.json").read_text())["estimators"]["concept_influence"]["seconds_per_1k"] \
        * n / 1000


def _spearman(predicted: np.ndarray, y: np.ndarray) -> float:
    """Spearman of the first stage with the exact scores (with several rankings: the lowest)."""
    return min(spearmanr(predicted, column)[0] for column in y.reshape(len(y), -1).T)


def exact_rankings(folder: Path, union: bool = True) -> tuple[np.ndarray, list[str], str]:
    """A pool's exact scores ``[N]`` (``union``: ``[N, 2]``, the behaviour's ranking aligned as the second column),
    their ids and the exact estimator's name."""
    exact = Scores.load(folder / "scores" / "concept_influence.safetensors")
    y, ids = exact.column(0).astype(np.float64), list(exact.ids)
    if union:
        behaviour = Scores.load(folder / "scores" / "behaviour.safetensors").aligned(ids)[:, 0]
        y = np.stack([y, behaviour.astype(np.float64)], axis=1)
    return y, ids, exact.estimator


def stop_rule(text: str) -> float | str:
    """``--stop``: a share of the batch, or ``bound`` (see ``LearnedFirstStage.retrieve``)."""
    return text if text == "bound" else float(text)


def study(folder: Path, reps: int, budget_share: float = 0.1, union: bool = False, default: bool = False,
          extra: tuple[str, np.ndarray, float] | None = None, stop: float | str | None = None) -> list[str]:
    """Markdown rows: one per variant of :data:`VARIANTS` (``union``: on the two rankings of the union; ``union`` or
    ``default``: the library's default variant only; ``stop``: that variant with this stop rule instead, its only
    row), and the limit a perfect free first stage reaches. ``extra``:
    (label, dense ``[N, F]`` features in the pool's score order, their cost as a share of exact scoring of all N),
    standardised and set beside the words; the label joins the variant's and the cost the stage's."""
    y, ids, _ = exact_rankings(folder, union)
    n = len(y)
    k, budget = n // 100, int(round(budget_share * n))
    truth = union_top(y, k)  # the true top k (ties by position), or the true union of each ranking's
    limit = best_certifiable(n, k, budget, rankings=1 if y.ndim == 1 else y.shape[1], union=len(truth))
    all_exact = exact_seconds(folder, n)
    t0 = time.perf_counter()
    features = text_features(pool_examples(folder, ids))
    feature_share = (time.perf_counter() - t0) / all_exact
    if extra is not None:
        dense = StandardScaler().fit_transform(np.asarray(extra[1], dtype=np.float64))
        features, feature_share = sparse.hstack([features, sparse.csr_matrix(dense)]).tocsr(), feature_share + extra[2]
    rows = []
    if stop is None:
        variants = VARIANTS[:1] if union or default else VARIANTS
    else:  # the default variant with another stop rule, not marked as the default
        label, share, refine, batch, _ = VARIANTS[0]
        variants = ((f"{label}, stop {stop if isinstance(stop, str) else format(stop, 'g')}", share, refine, batch,
                     stop),)
    marked = stop is None
    for variant, (label, share, refine, batch, rule) in enumerate(variants):
        sample = max(10, int(round(share * budget)))  # fit_first_stage needs ten (two per fold)
        got = []
        for rep in range(reps):
            rng = np.random.default_rng(1000 * rep + sample)
            t0 = time.perf_counter()  # the array scorer is free: this is the stage's own time (fits and predictions)
            stage = fit_first_stage(features, array_scorer(y), sample, seed=rng)
            options = dict(refine=True, batch=max(1, round(batch * k)), stop=rule) if refine else dict(refine=False)
            res = stage.retrieve(array_scorer(y), k, budget=budget, seed=rng, project=(), **options)
            own = (time.perf_counter() - t0) / all_exact
            rest = np.setdiff1d(np.arange(n), stage.sample)
            recall = len(np.intersect1d(truth, res.top)) / len(truth)
            got.append((res.recall_bound, recall, recall >= res.recall_bound, stage.heldout_spearman,
                        _spearman(stage.scores[rest], y[rest]), own, res.prescored + res.shortlist,
                        len(stage.rounds), res.spent / n))
        a = np.array(got, dtype=np.float64)
        cert = a[:, 0]
        chosen = (" **default**" if variant == 0 and marked else "") + (", union with the behaviour's ranking" if union else "") \
            + (f", {extra[0]}" if extra is not None else "")
        rows.append(f"| {folder.name} | {n} | {k} | {label}{chosen} | {sample} | {int(np.median(a[:, 6]))} "
                    f"({int(np.median(a[:, 7]))}) | {np.median(a[:, 3]):.2f} / {np.median(a[:, 4]):.2f} | "
                    f"**{np.median(cert):.3f}** ({cert.min():.3f}–{cert.max():.3f}) | {(cert >= 0.95).mean():.2f} | "
                    f"{np.median(a[:, 1]):.3f} ({a[:, 1].min():.3f}) | **{a[:, 2].mean():.3f}** | "
                    f"{np.median(a[:, 8]):.3f} + {feature_share + np.median(a[:, 5]):.4f} | "
                    f"{limit:.3f} |")
        print(f"{folder.name} {label} {share}: {reps} reps in {a[:, 5].sum() * all_exact:.0f} s", file=sys.stderr)
    return rows


def rankings(folder: Path) -> str:
    """A markdown row on a pool's two rankings (``scores/concept_influence`` and ``scores/behaviour``): their
    Spearman, the size of the union of each one's top 1 % and, on emergent pools, each one's planted AUROC."""
    y, ids, estimator = exact_rankings(folder)
    k = max(1, round(0.01 * len(y)))
    union = len(union_top(y, k))
    planted = pool_planted(folder, ids)
    aurocs = [retrieval_metrics(column, planted)["auroc"] for column in y.T]
    return (f"| {folder.name} | {estimator} | {len(y)} | {spearmanr(y[:, 0], y[:, 1])[0]:.2f} | {union} "
            f"({union / k:.2f} k) | {aurocs[0]:.3f} | {aurocs[1]:.3f} | {stability(folder)} |")


def stability(folder: Path) -> str:
    """What the stability check a run reports (``run_stability``) says of the exact ranking on this pool, against the
    behaviour's ranking and, where the pool has them, SOURCE's checkpoint parts: "warns" and the variants below the
    agreement it asks for, or "stable" and the lowest agreement."""
    scores = folder / "scores"
    behaviour = Scores.load(scores / "behaviour.safetensors")
    behaviour = behaviour.select(["behaviour"], metadata={"variants": {"behaviour": "behaviour"}})
    parts = {}
    if (scores / "source_parts.safetensors").exists():
        source_parts = Scores.load(scores / "source_parts.safetensors")
        parts = {str(i): source_parts.select([c]) for i, c in enumerate(source_parts.columns)}
    report = run_stability(Scores.load(scores / "concept_influence.safetensors"), behaviour, parts)
    if report.stable:
        return f"stable (lowest {min(report.agreement.values()):.2f})"
    return "warns: " + ", ".join(f"{v} {report.agreement[v]:.2f}" for v in report.disagreeing)


#: the header of :func:`study`'s rows
TABLE_HEAD = ("| pool | N | k | variant | sample | scored before the sample (rounds) | Spearman held-out / pool | "
              "certified | P(≥ 0.95) | true recall (worst) | coverage | cost (exact + first stage) | limit |\n"
              "|---|---:|---:|---|---:|---|---|---|---:|---|---:|---|---:|")
#: pool sizes and first-stage costs (a share of exact scoring of all N) of the limits table
LIMIT_SIZES, LIMIT_COSTS = (20_000, 50_000, 80_000, 120_000, 200_000, 500_000, 1_000_000), (0.0, 0.01, 0.03)


def limits(total: float = 0.1) -> str:
    """A markdown table: at k = 1 % of N, δ = 0.05 and ``total`` of exact scoring's cost end to end, what a perfect
    free first stage certifies (``best_certifiable``) when the first stage costs each of :data:`LIMIT_COSTS` (the
    rest buys exact scores), and the shortlist ``default_split`` leaves it, in units of k: how far below the top k the
    first stage may misplace a top-k example and still have it scored."""
    head = " | ".join(f"first stage {100 * c:g} %: limit | shortlist / k" for c in LIMIT_COSTS)
    rows = [f"| N | {head} |", "|---:|" + "---:|---:|" * len(LIMIT_COSTS)]
    for n in LIMIT_SIZES:
        k, cells = n // 100, []
        for cost in LIMIT_COSTS:
            budget = int(round((total - cost) * n))
            cells += [f"{best_certifiable(n, k, budget):.3f}", f"{default_split(n, k, budget) / k:.1f}"]
        rows.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path, help="pool folders of retrieval_large_pool.py")
    p.add_argument("--reps", type=int, default=200, help="repetitions per row (default 200)")
    p.add_argument("--union", action="store_true", help="the union with the behaviour's ranking instead (pools with "
                                                        "scores/behaviour.safetensors)")
    p.add_argument("--default", action="store_true", help="the library's default variant only")
    p.add_argument("--rankings", action="store_true", help="instead, a table of each pool's two rankings (pools with "
                                                           "scores/behaviour.safetensors)")
    p.add_argument("--stop", type=stop_rule, help="the default variant with this stop rule instead (its only row; 0: "
                   "the rounds use all the room default_split leaves; bound: they go on while a batch finds more of "
                   "the top than the next batch costs the certificate's sample)")
    p.add_argument("--budget-share", type=float, default=0.1, help="exact scores as a share of N (default 0.1)")
    p.add_argument("--limits", action="store_true", help="instead, the limits table (no pool is read)")
    args = p.parse_args(argv)
    if args.limits:
        print(limits())
        return 0
    if not args.folders:
        p.error("give pool folders (or --limits)")
    if args.rankings:
        print("| pool | exact estimator | N | Spearman with the behaviour's ranking | union of each one's top 1 % | "
              "planted AUROC: exact | behaviour's | stability check of the exact ranking (agreement) |\n"
              "|---|---|---:|---:|---:|---:|---:|---|")
        for folder in args.folders:
            print(rankings(folder), flush=True)
        return 0
    command = "OMP_NUM_THREADS=1 python benchmarks/retrieval_learned.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    share = f"{100 * args.budget_share:g} %"
    print(f"# The learned first stage: certified retrieval at {share} of N in exact scores\n")
    print(f"`{command}`\n")
    print(f"k = 1 % of N, δ = 0.05, a budget of {share} of N exact scores **including** the learned stage's sample "
          f"(a uniform sample of the share of the budget shown, scored exactly; a ridge regression from the chats' "
          f"TF-IDF word features to their exact scores ranks the rest; the sample joins the shortlist as prescored "
          f"examples). **Refined**: the shortlist is built in rounds (score the best-predicted batch, refit on every "
          f"exact score so far, until a batch puts at most `stop` of its examples above the k-th best found or the "
          f"shortlist reaches `default_split`'s size; `LearnedFirstStage.retrieve`); **single fit**: the first fit's "
          f"top M (`default_split`) at once, the previous version. {args.reps} repetitions per row, each a new "
          f"training sample and a new retrieval sample. Scored before the sample: the sample plus the shortlist "
          f"(median; rounds in brackets). Spearman: held-out on the sample (5-fold) / the first fit's on the rest of "
          f"the pool. Certified: median (worst–best) of the recall bound; P(≥ 0.95): the share of repetitions "
          f"certifying 0.95; coverage: the share where the true recall is ≥ the bound (must be ≥ 0.95). Cost: exact "
          f"scores / N + the learned stage's own seconds (features, fits and predictions) over exact scoring of all "
          f"N, measured on this machine against the pool builder's exact-scoring seconds; **default**: the library's "
          f"defaults (`default_sample`, batch k/4, stop {REFINE_STOP}). Limit: what a perfect free first stage "
          f"certifies at {share} (`best_certifiable`).\n")
    if args.union:
        print("**Union** (`--union`): the exact scores are two rankings, exact Concept Influence and the behaviour's "
              "own (classic gradient-dot on the behaviour's examples, scored in the same pass), retrieved together as "
              "the union a run answers with: each ranking's threshold, one sample for both, the answer the union of "
              "each one's top k found, the bound `union_recall_bound`; certified and true recall are of the true "
              "union of each ranking's top k (between k and 2k examples). The ridge has one output per ranking and "
              "ranks by their union; Spearman: the lower of the two. Limit: a perfect free first stage whose "
              "shortlist is the true union.\n")
    print(TABLE_HEAD)
    for folder in args.folders:
        for row in study(folder, args.reps, args.budget_share, union=args.union, default=args.default,
                         stop=args.stop):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
