"""The learned first stage (concept_influence/retrieval_learned.py) on real pools whose exact scores are all known:
certified recall, true recall and coverage at 10 % of N in exact scores **end to end** (the learned stage's sample
counts in the budget; its features and fit are timed against exact scoring of all N), over repetitions that each draw
a new training sample and a new retrieval sample (issue 28, criterion 2).

Pools: folders written by ``benchmarks/retrieval_large_pool.py`` (any ``--design``); the chats are rebuilt from
their ``pool.json`` and checked against the score file's ids. Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/retrieval_learned.py runs/retrieval-pool-20k runs/retrieval-emergent-20k \\
        runs/retrieval-emergent-80k > benchmarks/retrieval-learned.md
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
from scipy.stats import spearmanr  # noqa: E402

from concept_influence.evaluation import top_k_recall  # noqa: E402
from concept_influence.retrieval import array_scorer, best_certifiable  # noqa: E402
from concept_influence.retrieval_learned import default_sample, fit_first_stage, text_features  # noqa: E402
from concept_influence.scores import Scores  # noqa: E402
from concept_influence_benchmarks.retrieval_pools import pool_examples  # noqa: E402

#: the learned stage's sample, as a share of the budget
SHARES = (0.1, 0.2, 0.3)


def exact_seconds(folder: Path, n: int) -> float:
    """Seconds the pool builder spent scoring all N exactly (``seconds.json`` or the demo's results)."""
    if (folder / "seconds.json").exists():
        return json.loads((folder / "seconds.json").read_text())["exact scoring"]
    return json.loads((folder / "results.json").read_text())["estimators"]["concept_influence"]["seconds_per_1k"] \
        * n / 1000


def study(folder: Path, reps: int, budget_share: float = 0.1) -> list[str]:
    """Markdown rows: one per sample share of :data:`SHARES`, and the limit a perfect free first stage reaches."""
    exact_scores = Scores.load(folder / "scores" / "concept_influence.safetensors")
    y, ids = exact_scores.column(0).astype(np.float64), list(exact_scores.ids)
    n = len(y)
    k, budget = n // 100, int(round(budget_share * n))
    all_exact = exact_seconds(folder, n)
    t0 = time.perf_counter()
    features = text_features(pool_examples(folder, ids))
    feature_share = (time.perf_counter() - t0) / all_exact
    rows = []
    for share in SHARES:
        sample = int(round(share * budget))
        got = []
        for rep in range(reps):
            rng = np.random.default_rng(1000 * rep + sample)
            t0 = time.perf_counter()
            stage = fit_first_stage(features, array_scorer(y), sample, seed=rng)
            fit_share = stage.seconds["fit and predict"] / all_exact
            res = stage.retrieve(array_scorer(y), k, budget=budget, seed=rng, project=())
            rest = np.setdiff1d(np.arange(n), stage.sample)
            recall = top_k_recall(res.top, y, k)
            got.append((res.recall_bound, recall, recall >= res.recall_bound, stage.heldout_spearman,
                        spearmanr(stage.scores[rest], y[rest])[0], fit_share, res.shortlist,
                        res.spent / n, time.perf_counter() - t0))
        a = np.array(got, dtype=np.float64)
        cert = a[:, 0]
        chosen = " **default**" if sample == default_sample(n, k, budget) else ""
        rows.append(f"| {folder.name} | {n} | {k} | {sample} ({share:.0%} of budget){chosen} | {int(np.median(a[:, 6]))} | "
                    f"{np.median(a[:, 3]):.2f} / {np.median(a[:, 4]):.2f} | **{np.median(cert):.3f}** "
                    f"({cert.min():.3f}–{cert.max():.3f}) | {(cert >= 0.95).mean():.2f} | {np.median(a[:, 1]):.3f} "
                    f"({a[:, 1].min():.3f}) | **{a[:, 2].mean():.3f}** | {np.median(a[:, 7]):.3f} + "
                    f"{feature_share + np.median(a[:, 5]):.4f} | {best_certifiable(n, k, budget):.3f} |")
        print(f"{folder.name} share {share}: {reps} reps in {a[:, 8].sum():.0f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="pool folders of retrieval_large_pool.py")
    p.add_argument("--reps", type=int, default=200, help="repetitions per row (default 200)")
    args = p.parse_args(argv)
    command = "OMP_NUM_THREADS=1 python benchmarks/retrieval_learned.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print("# The learned first stage: certified retrieval at 10 % of N end to end\n")
    print(f"`{command}`\n")
    print(f"k = 1 % of N, δ = 0.05, a budget of 10 % of N exact scores **including** the learned stage's sample "
          f"(a uniform sample of the share of the budget shown, scored exactly, then a ridge regression from the "
          f"chats' TF-IDF word features to their exact scores ranks the rest; the sample joins the shortlist as "
          f"prescored examples); the shortlist M by `default_split` on the rest. {args.reps} repetitions per row, each "
          f"a new training sample and a new retrieval sample. Spearman: held-out on the sample (5-fold) / on the rest "
          f"of the pool. Certified: median (worst–best) of the recall bound; P(≥ 0.95): the share of repetitions "
          f"certifying 0.95; coverage: the share where the true recall is ≥ the bound (must be ≥ 0.95). Cost: exact "
          f"scores / N + the learned stage's own seconds (features and fit) over exact scoring of all N, measured on "
          f"this machine against the pool builder's exact-scoring seconds; **default**: the share `default_sample` "
          f"picks. Limit: what a perfect free first stage "
          f"certifies at 10 % (`best_certifiable`).\n")
    print("| pool | N | k | learned-stage sample | M | Spearman held-out / pool | certified | P(≥ 0.95) | "
          "true recall (worst) | coverage | cost (exact + first stage) | limit |")
    print("|---|---:|---:|---|---:|---|---|---:|---|---:|---|---:|")
    for folder in args.folders:
        for row in study(folder, args.reps):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
