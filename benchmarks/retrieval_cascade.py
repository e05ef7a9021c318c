"""Can the recommended estimator's own cheapest part stand in for it in the first stage? SOURCE sums one part per
checkpoint of the fine-tune, each its own scoring pass (a third of an exact score with three checkpoints); on the
design-4:0 pool one part has Spearman 0.97 with the sum. The cascade tried here: the learned stage's rounds score
with that part instead of exact SOURCE (three times as many chats per unit of budget, the ridge refitted on the
part's scores), the part-scored chats go above the rest in the part's order, and the exact shortlist and sample of
``certified_retrieval`` follow that ranking with what is left of the budget. The part is the one that agrees best
with SOURCE on the stage's uniform sample (where SOURCE computes every part anyway); its cost is its scoring pass's
seconds over the pool builder's exact-scoring seconds, both measured in the same build.

Pools: folders of ``retrieval_large_pool.py --source`` with ``scores/source_parts.safetensors``. Each repetition fits
the words stage once on a new uniform sample and retrieves from it with the library's default (exact rounds) and
with the cascade at each ``--shares`` of the budget, with the same seed. First a table of how much of SOURCE's top k
each part's own top M holds. Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/retrieval_cascade.py runs/retrieval-emergent-120k-source-d4.0-parts
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from concept_influence.retrieval import array_scorer, best_certifiable, certified_retrieval  # noqa: E402
from concept_influence.retrieval_learned import default_sample, fit_first_stage, text_features  # noqa: E402
from concept_influence.scores import Scores  # noqa: E402
from concept_influence_benchmarks.retrieval_pools import pool_examples  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import retrieval_learned as learned  # noqa: E402

HEAD = ("| pool | N | k | variant | part chosen (repetitions) | part scores | exact: prescored + shortlist / sample | "
        "certified | P(≥ 0.95) | true recall (worst) | coverage | cost: exact + part | limit |\n"
        "|---|---:|---:|---|---|---:|---|---|---:|---|---:|---|---:|")


def part_costs(folder: Path, ids: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The pool's SOURCE parts ``[N, P]`` in the order of ``ids`` (the exact score file's), their names, and each
    part's cost per example in exact scores (its scoring pass over the pool builder's exact-scoring seconds)."""
    parts = Scores.load(folder / "scores" / "source_parts.safetensors")
    seconds = np.asarray(parts.metadata["pass_seconds"], dtype=np.float64)
    return parts.aligned(ids), list(parts.columns), seconds / learned.exact_seconds(folder, len(ids))


def overlap(folder: Path, multiples=(1, 2, 4, 8, 16)) -> str:
    """A markdown table: the share of SOURCE's top k in each part's own top M, M a multiple of k."""
    y, ids, _ = learned.exact_rankings(folder, union=False)
    parts, names, costs = part_costs(folder, ids)
    k = len(y) // 100
    truth = np.argsort(-y, kind="stable")[:k]
    lines = ["| part | cost | Spearman with SOURCE | " + " | ".join(f"in its top {m}·k" for m in multiples) + " |",
             "|---|---:|---:|" + "---:|" * len(multiples)]
    for j, name in enumerate(names):
        order = np.argsort(-parts[:, j], kind="stable")
        lines.append(f"| {name} | {costs[j]:.3f} | {spearmanr(parts[:, j], y)[0]:.3f} | " + " | ".join(
            f"{np.isin(truth, order[:m * k]).mean():.3f}" for m in multiples) + " |")
    return "\n".join(lines)


def cascade(stage, exact, cheap, cost: float, share: float, k: int, budget: int, seed: int):
    """The cascade (module docstring) from a fitted stage: its result and the number of part scores."""
    known, values, scores = stage.sample, cheap[stage.sample], stage.scores
    allowance, batch = int(share * (budget - len(known)) / cost) - len(known), max(k // 4, 40)
    while allowance > 0:
        unscored = np.setdiff1d(np.arange(len(scores)), known)
        chosen = np.sort(unscored[np.argsort(-scores[unscored], kind="stable")[:min(batch, allowance)]])
        known, values, allowance = np.concatenate([known, chosen]), np.concatenate([values, cheap[chosen]]), \
            allowance - len(chosen)
        scores = stage._predict(known, values)
    ranking = scores.copy()
    ranking[known] = scores.max() + 1 + np.argsort(np.argsort(values, kind="stable"), kind="stable")
    left = budget - math.ceil(cost * len(known))
    return certified_retrieval(ranking, array_scorer(exact), k, budget=left, prescored=(stage.sample,
                               exact[stage.sample]), seed=np.random.default_rng(seed), project=()), len(known)


def study(folder: Path, reps: int, budget_share: float, shares: list[float]) -> list[str]:
    """Markdown rows: the default and the cascade at each share over ``reps`` repetitions (module docstring)."""
    y, ids, _ = learned.exact_rankings(folder, union=False)
    parts, names, costs = part_costs(folder, ids)
    n = len(y)
    k, budget = n // 100, int(round(budget_share * n))
    truth = np.argsort(-y, kind="stable")[:k]
    features = text_features(pool_examples(folder, ids))
    got = {share: [] for share in [None, *shares]}
    for rep in range(reps):
        stage = fit_first_stage(features, array_scorer(y), default_sample(budget), seed=np.random.default_rng(rep))
        chosen = int(np.nanargmax([spearmanr(parts[stage.sample, j], y[stage.sample])[0]
                                   for j in range(parts.shape[1])]))
        for share in got:
            if share is None:
                res, cheap_scores = stage.retrieve(array_scorer(y), k, budget=budget, project=(),
                                                   seed=np.random.default_rng(10_000 + rep)), 0
            else:
                res, cheap_scores = cascade(stage, y, parts[:, chosen], float(costs[chosen]), share, k, budget,
                                            10_000 + rep)
            recall = len(np.intersect1d(truth, res.top)) / k
            got[share].append((res.recall_bound, recall, recall >= res.recall_bound, cheap_scores,
                               res.prescored + res.shortlist, res.spent - res.prescored - res.shortlist,
                               res.spent / n, (budget - res.budget) / n, chosen))  # the part's scores' share
        print(f"{folder.name}: repetition {rep + 1}/{reps}", file=sys.stderr, flush=True)
    limit = best_certifiable(n, k, budget)
    rows = []
    for share, values in got.items():
        a = np.array(values, dtype=np.float64)
        cert = a[:, 0]
        picks = np.bincount(a[:, 8].astype(int), minlength=len(names))
        label = "default (exact rounds)" if share is None else f"cascade, {share:.0%} of the budget to the part"
        part = "—" if share is None else ", ".join(f"{names[j]} ({c})" for j, c in enumerate(picks) if c)
        rows.append(f"| {folder.name} | {n} | {k} | {label} | {part} | {int(np.median(a[:, 3]))} | "
                    f"{int(np.median(a[:, 4]))} / {int(np.median(a[:, 5]))} | **{np.median(cert):.3f}** "
                    f"({cert.min():.3f}–{cert.max():.3f}) | {(cert >= 0.95).mean():.2f} | {np.median(a[:, 1]):.3f} "
                    f"({a[:, 1].min():.3f}) | **{a[:, 2].mean():.3f}** | {np.median(a[:, 6]):.3f} + "
                    f"{np.median(a[:, 7]):.3f} | {limit:.3f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="pools of retrieval_large_pool.py --source")
    p.add_argument("--reps", type=int, default=200, help="repetitions (default 200)")
    p.add_argument("--budget-share", type=float, default=0.09, help="exact scores as a share of N (default 0.09: "
                                                                     "the learned stage's own ~1 %% inside 10 %%)")
    p.add_argument("--shares", type=float, nargs="+", default=[0.15, 0.35],
                   help="shares of the budget the cascade's part may spend (default 0.15 0.35)")
    args = p.parse_args(argv)
    command = "OMP_NUM_THREADS=1 python benchmarks/retrieval_cascade.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"`{command}`\n")
    for folder in args.folders:
        print(f"{folder.name}:\n\n{overlap(folder)}\n")
    print(HEAD)
    for folder in args.folders:
        for row in study(folder, args.reps, args.budget_share, args.shares):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
