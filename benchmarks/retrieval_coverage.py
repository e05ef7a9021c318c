"""Certified retrieval (concept_influence.retrieval): is the recall bound honest, and what does it certify for a budget?

Pools whose exact scores are all known, so the true top k and the recall of what is found are known: synthetic
pools of N examples with heavy-tailed exact scores (Student t, 2 degrees of freedom) and a first stage whose
Spearman correlation with them is 0.3, 0.6 or 0.9, built two ways: a Gaussian copula (the first stage is as good at
the top as anywhere) and an additive one (first stage = exact + Gaussian noise, the noise scaled to the Spearman
correlation: the heavy tail stands out of the noise, so the first stage is better at the top); and, with ``--real
DIR``, the score files a planted-data run wrote (``DIR/scores/*.safetensors``: the exact estimator's scores with
``probe_projection``, the forward-only fast path, as first stage). Each repetition draws a new pool and a new
sample, and counts whether the true recall of the k found is >= the stated bound. k = 1 % of N, delta = 0.05, the
budget of exact scores 10 % of N, split by ``default_split``.

Usage, from the repository root (about 10 minutes on one thread):

    OMP_NUM_THREADS=1 python benchmarks/retrieval_coverage.py --real runs/demo > benchmarks/retrieval.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm, spearmanr
from scipy.stats import t as student_t

from concept_influence.evaluation import top_k_recall
from concept_influence.retrieval import array_scorer, best_certifiable, certified_retrieval, default_split, minimum_budget
from concept_influence_benchmarks.retrieval_pools import FIRST_STAGES

SPEARMAN = (0.3, 0.6, 0.9)
KINDS = ("copula", "additive")
DELTA = 0.05


def _copula(n: int, rho_s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    r = 2 * np.sin(np.pi * rho_s / 6)  # Pearson of the Gaussian copula with Spearman rho_s
    z = rng.standard_normal(n)
    first = r * z + np.sqrt(1 - r * r) * rng.standard_normal(n)
    return first, student_t.ppf(norm.cdf(z), df=2)


_NOISE: dict[float, float] = {}


def _noise_for(rho_s: float) -> float:
    """The noise scale at which exact + noise has Spearman rho_s with exact (bisection on a 200k pool, seed 0)."""
    if rho_s not in _NOISE:
        rng = np.random.default_rng(0)
        y, e = rng.standard_t(2, 200_000), rng.standard_normal(200_000)
        lo, hi = 1e-3, 100.0
        for _ in range(40):
            mid = np.sqrt(lo * hi)
            lo, hi = (mid, hi) if spearmanr(y, y + mid * e)[0] > rho_s else (lo, mid)
        _NOISE[rho_s] = float(np.sqrt(lo * hi))
    return _NOISE[rho_s]


def _additive(n: int, rho_s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.standard_t(2, n)
    return y + _noise_for(rho_s) * rng.standard_normal(n), y


def _run(make, reps: int, k: int, budget: int, seed: int, **kwargs) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(reps):
        first, exact = make(rng)
        res = certified_retrieval(first, array_scorer(exact), k, DELTA, budget, seed=rng, project=(2.0,), **kwargs)
        unscored = np.ones(len(exact), dtype=bool)
        unscored[res.scored] = False
        rows.append((res.recall_bound, top_k_recall(res.top, exact, k), res.spent / len(exact),
                     res.projected[int(round(budget * 2))], res.shortlist,
                     (exact[unscored] >= res.threshold).sum() <= res.beaters_bound))
    a = np.array(rows)
    return {"coverage": float(np.mean(a[:, 1] >= a[:, 0])), "count_coverage": float(a[:, 5].mean()),
            "bound": float(a[:, 0].mean()),
            "bound_p10": float(np.quantile(a[:, 0], 0.1)), "certified95": float(np.mean(a[:, 0] >= 0.95)),
            "recall": float(a[:, 1].mean()), "cost": float(a[:, 2].mean()), "projected2x": float(a[:, 3].mean()),
            "shortlist": int(a[0, 4])}


def _synthetic(kind: str, n: int, rho: float):
    gen = _copula if kind == "copula" else _additive
    return lambda rng: gen(n, rho, rng)




def _real_pairs(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray, float | None]]:
    """(name, first stage, exact, the first stage's cost / exact scoring of all N or None) from a planted-data run
    folder: each gradient estimator's scores paired with each first stage there (``FIRST_STAGES``; the costs from
    ``seconds.json`` where the folder has one, the EK-FAC fit shared and charged to neither)."""
    from concept_influence.scores import Scores

    scores = folder / "scores"
    seconds = json.loads((folder / "seconds.json").read_text()) if (folder / "seconds.json").exists() else None
    firsts = {stage: Scores.load(scores / f"{stage}.safetensors") for stage in FIRST_STAGES
              if (scores / f"{stage}.safetensors").exists()}
    pairs = []
    for name in ("concept_influence", "concept_influence[checkpoints]", "concept_influence[pretrain+pool][checkpoints]"):
        path = scores / f"{name}.safetensors"
        if not path.exists():
            continue
        exact = Scores.load(path)
        for stage, first in firsts.items():
            cost = sum(seconds[s] for s in FIRST_STAGES[stage]) / seconds["exact scoring"] if seconds else None
            label = name if stage == "probe_projection" else f"{name}, first stage {stage}"
            pairs.append((f"{folder.name}: {label}", first.aligned(exact.ids)[:, 0], exact.column(0), cost))
    return pairs


def _family_table(folder: Path, reps: int) -> list[str]:
    """Coverage on the real pools of a family study (``bench emergent --variants``, each run's ``scores.safetensors``
    of the runs where planting raised the behaviour): the forward-only probe projection as first stage, and as exact
    scores SOURCE's ranking and the recommended union; per setting, the pools' coverage summarised."""
    from concept_influence.fileio import load_tensors

    runs = [p.parent for p in sorted(folder.glob("*/results.json"))
            if json.loads(p.read_text())["behaviour"]["raised"]]
    exact_names = {"SOURCE": "source[adam]x1|pool|all", "union": "union of source[adam]x1|pool|all and grad_dot|all"}
    rows = {}
    for run in runs:
        scores = {k: v.numpy() for k, v in load_tensors(run / "scores.safetensors", ValueError).items()}
        first = scores["probe_projection"]
        for label, name in exact_names.items():
            exact, n = scores[name], len(first)
            for setting, (k, budget) in {"k = 1 %, budget 10 %": (max(1, n // 100), n // 10),
                                         "k = 5 %, budget 50 %": (max(1, n // 20), n // 2)}.items():
                r = _run(lambda rng, f=first, e=exact: (f, e), reps, k, budget, seed=1)
                rows.setdefault((label, setting), []).append((r["coverage"], r["bound"], r["recall"], n,
                                                              spearmanr(first, exact)[0]))
    out = [f"## Real emergent pools: {len(runs)} runs of the family study (`{folder}`)", "",
           f"Each run's pool (N = {min(v[3] for v in next(iter(rows.values())))}–"
           f"{max(v[3] for v in next(iter(rows.values())))}) is fixed; {reps} repetitions each draw a new sample. First "
           "stage: `probe_projection` (forward only). Coverage per pool: the share of repetitions whose true recall of "
           "the k found is ≥ the stated bound.", "",
           "| exact scores | setting | pools | first stage Spearman, median | coverage, median | worst pool | "
           "pools with coverage < 0.95 | coverage, all repetitions | certified recall, mean | true recall, mean |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, setting), v in rows.items():
        a = np.array(v)
        out.append(f"| {label} | {setting} | {len(a)} | {np.median(a[:, 4]):.2f} | {np.median(a[:, 0]):.3f} | "
                   f"{a[:, 0].min():.3f} | {int((a[:, 0] < 0.95).sum())} | **{a[:, 0].mean():.3f}** | "
                   f"{a[:, 1].mean():.3f} | {a[:, 2].mean():.3f} |")
    return out


def _sweeps(args) -> list[str]:
    """The synthetic sweeps' tables: what a budget certifies, and how the split of a budget matters."""
    out = ["", "## What a budget certifies (uniform design, default split)", "",
           f"Mean certified recall over {args.sweep_reps} repetitions per cell, k = 1 % of N, δ = {DELTA}; the budget as a "
           "fraction of N.", "",
           "| pool | N | Spearman | 5 % | 10 % | 20 % | 40 % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        for n in args.sizes:
            for rho in SPEARMAN:
                cells = [_run(_synthetic(kind, n, rho), args.sweep_reps, n // 100, int(f * n), seed=2)["bound"]
                         for f in (0.05, 0.1, 0.2, 0.4)]
                out.append(f"| {kind} | {n} | {rho} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
                print(out[-1], file=sys.stderr, flush=True)

    fracs = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    out += ["", "## The split of the budget (uniform design)", "",
            f"Mean certified recall over {args.sweep_reps} repetitions by the shortlist's share of a budget of 10 % of N "
            "(k = 1 % of N); `default` is `default_split`'s choice. Pools with Spearman 0.3 certify nothing at this "
            "budget and are left out.", "",
            "| pool | N | Spearman | " + " | ".join(f"M = {f:.0%}" for f in fracs) + " | default |",
            "|---|---:|---:|" + "---:|" * (len(fracs) + 1)]
    for kind in KINDS:
        for n in args.sizes:
            for rho in (0.6, 0.9):
                cells = [_run(_synthetic(kind, n, rho), args.sweep_reps, n // 100, n // 10, seed=3,
                              shortlist=max(n // 100, int(f * n // 10)))["bound"] for f in fracs]
                m = default_split(n, n // 100, n // 10, DELTA)
                out.append(f"| {kind} | {n} | {rho} | " + " | ".join(f"{c:.3f}" for c in cells)
                           + f" | M = {m / (n // 10):.0%} |")
                print(out[-1], file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000],
                   help="sizes of the synthetic pools (none: the real pools alone)")
    p.add_argument("--sweep-reps", type=int, default=40, help="repetitions per cell of the budget and split sweeps")
    p.add_argument("--real-reps", type=int, default=2000, help="repetitions on a real (fixed, small) pool")
    p.add_argument("--real", type=Path, action="append", default=[], help="a planted-data run folder (repeatable)")
    p.add_argument("--family", type=Path, help="only the table of a family study's real pools (bench emergent "
                                                 "--variants OUT)")
    args = p.parse_args(argv)
    given = " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    command = f"OMP_NUM_THREADS=1 python benchmarks/retrieval_coverage.py {given}"
    if args.family is not None:
        print("\n".join([f"# Certified retrieval on real emergent pools\n\nReproduce: `{command.strip()}`. k, δ = "
                         f"{DELTA} and the default split as in `benchmarks/retrieval.md`.\n",
                         *_family_table(args.family, args.reps)]))
        return 0
    start = time.time()
    out = ["# Certified retrieval: coverage, certified recall and cost", "",
           f"Reproduce: `{command.strip()}` (the markdown goes to stdout).", "",
           f"k = 1 % of N, δ = {DELTA}, a budget of exact scores of 10 % of N (the goal; 40 % in a third row, where the "
           "bound is not trivial and its coverage is tested) split by `default_split` (shortlist M, "
           "the rest a uniform random sample of the other N − M; `stratified`: two strata by first-stage rank, the "
           "first the size of the shortlist, sampled in proportion, δ split between them). Coverage: the share of "
           "repetitions (each a new pool and a new sample) where the true recall of the k found is ≥ the stated "
           "bound; it must be ≥ 0.95. Count coverage: the share where the unscored examples at or above the shortlist's "
           "k-th exact score number at most the certified count (the hypergeometric step alone; the recall bound "
           "adds slack: not every such example is in the true top k). Cost: exact scores / N (the first stage's own "
           "cost is not counted). Over 200 repetitions a share has a standard error of about 0.015 at 0.95, so a "
           "count coverage down to about 0.92 is what a bound of exactly 0.95 shows; a real pool is fixed (the "
           "sample alone is random) and gets 2,000 repetitions. Real pools: the score files of a planted-data run "
           "(`runs/retrieval-demo-quick` is `concept-influence demo --quick --out runs/retrieval-demo-quick`: "
           "240 pool examples, seed 0), each Concept Influence variant as exact score and `probe_projection` as "
           "first stage, and where the folder has them the encoders (`encoder`: the inputs of every block's maps, "
           "`encoder[block 0]`: block 0's alone; fitted on the index of a 5 % sample); \"+ x first stage\": the first "
           "stage's own cost over exact scoring of all N, measured in the same run (`seconds.json`; the EK-FAC fit is "
           "shared and charged to neither). The limit row: the bound a perfect first stage gets (`best_certifiable`); "
           "\"M for 0.95\" (pools of 10,000 or more): the sample as large as a perfect first stage needs to certify "
           "0.95 (`minimum_budget` − k) and the shortlist the rest of 10 %, instead of `default_split`'s at most 60 % "
           "sample. "
           "Projected 2×: what the report says twice the budget would certify, from the sample's rates.", "",
           "| pool | N | first stage Spearman | design | budget | M | reps | coverage | count coverage | "
           "certified recall, mean (p10) | share certifying ≥ 0.95 | true recall of the k found | cost | projected bound at 2× |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        for n in args.sizes:
            for rho in SPEARMAN:
                for design, frac in (("uniform", 0.1), ("stratified", 0.1), ("uniform", 0.4)):
                    r = _run(_synthetic(kind, n, rho), args.reps, n // 100, int(frac * n), seed=1, design=design)
                    out.append(f"| {kind} | {n} | {rho} | {design} | {frac:.0%} | {r['shortlist']} | {args.reps} | "
                               f"**{r['coverage']:.3f}** | {r['count_coverage']:.3f} | {r['bound']:.3f} ({r['bound_p10']:.3f}) | "
                               f"{r['certified95']:.2f} | {r['recall']:.3f} | {r['cost']:.3f} | {r['projected2x']:.3f} |")
                    print(out[-1], file=sys.stderr, flush=True)
    for folder in args.real:
        pairs = _real_pairs(folder)
        n = len(pairs[0][2]) if pairs else 0  # one pool: every pair scores the same examples
        settings = [(max(1, n // 100), max(n // 10, max(1, n // 100)), None), (max(1, n // 20), n // 2, None)]
        if n >= 10_000:  # 10 %, the sample as large as a perfect first stage's needs for 0.95, the shortlist the rest
            shortlist = n // 10 - minimum_budget(n, n // 100, DELTA) + n // 100
            settings += [(n // 100, n // 10, shortlist)] if shortlist >= n // 100 else []
        for name, first, exact, first_cost in pairs:
            rho = spearmanr(first, exact)[0]
            for k, budget, shortlist in settings:
                r = _run(lambda rng: (first, exact), args.real_reps, k, budget, seed=1, shortlist=shortlist)
                cost = f"{r['cost']:.3f}" + ("" if first_cost is None else f" + {first_cost:.3f} first stage")
                design = "uniform" if shortlist is None else "uniform, M for 0.95"
                out.append(f"| real ({name}; k = {k}) | {n} | {rho:.2f} | {design} | {budget / n:.0%} | {r['shortlist']} | "
                           f"{args.real_reps} | **{r['coverage']:.3f}** | {r['count_coverage']:.3f} | "
                           f"{r['bound']:.3f} ({r['bound_p10']:.3f}) | "
                           f"{r['certified95']:.2f} | {r['recall']:.3f} | {cost} | {r['projected2x']:.3f} |")
                print(out[-1], file=sys.stderr, flush=True)
        if n >= 10_000:  # what sampling allows: a perfect first stage's bound
            k, budget = n // 100, n // 10
            out.append(f"| limit at N = {n}: a perfect first stage (`best_certifiable`) | {n} | 1.00 | uniform | "
                       f"{budget / n:.0%} | {k} | - | - | - | {best_certifiable(n, k, budget, DELTA):.3f} | - | 1.000 | "
                       f"{budget / n:.3f} | {best_certifiable(n, k, 2 * budget, DELTA):.3f} |")

    if args.sizes:  # the sweeps are over synthetic pools alone
        out += _sweeps(args)
    out += ["", f"Wall time: {time.time() - start:.0f} s on one thread."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
