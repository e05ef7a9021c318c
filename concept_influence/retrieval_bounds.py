"""The sampling arithmetic of certified retrieval (:mod:`.retrieval`): the exact hypergeometric upper bound, the
default budget and split, what a budget can certify with a perfect first stage, the strata and their bounds, and the
union of several rankings' top k with its recall bound."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import hypergeom

from .errors import ConceptInfluenceError

__all__ = ["RetrievalError", "hypergeometric_upper", "default_budget", "default_split", "best_certifiable",
           "minimum_budget", "union_recall_bound", "union_top"]


class RetrievalError(ConceptInfluenceError, ValueError):
    """Bad input to certified retrieval (names the argument)."""


def hypergeometric_upper(population: int, sample: int, found: int, delta: float) -> int:
    """The exact one-sided (1 − ``delta``) upper confidence bound on the number D of "successes" in a population of
    ``population`` items, when a uniform sample without replacement of ``sample`` of them holds ``found``: the
    largest D with P(Hypergeom(population, D, sample) ≤ found) > delta. ``sample == population`` gives ``found``;
    ``sample == 0`` gives ``population``."""
    if not 0 <= found <= sample <= population:
        raise RetrievalError(f"need 0 <= found ({found}) <= sample ({sample}) <= population ({population})")
    if sample == population:
        return found
    lo, hi = found, population - sample + found  # D >= found; at most found + the unsampled count
    if hypergeom.cdf(found, population, hi, sample) > delta:
        return hi
    while hi - lo > 1:  # invariant: cdf(lo) > delta >= cdf(hi)
        mid = (lo + hi) // 2
        if hypergeom.cdf(found, population, mid, sample) > delta:
            lo = mid
        else:
            hi = mid
    return lo


def default_budget(n: int, k: int) -> int:
    """The default budget of exact scores: 10 % of N, at least k, at most N."""
    return min(n, max(k, int(math.ceil(0.1 * n))))


def default_split(n: int, k: int, budget: int, delta: float = 0.05, target: float = 0.95, *, rankings: int = 1,
                  union: int | None = None) -> int:
    """The default shortlist size M for a budget: the sample gets what a sample that finds *no* example above the
    threshold needs to certify recall ``target`` (uniform design, exact hypergeometric bound), up to 60 % of the
    budget, or more when the shortlist still keeps twice k (without it, a budget that a perfect first stage could
    certify the target with would not: on an 80,000-example pool with 10 % scored the 60 % sample certified 0.943 with
    every one of the top k found); the shortlist gets the rest (at least k). When the budget cannot certify the target
    even if the sample finds nothing above the threshold, the split is 40 % shortlist / 60 % sample (the best shortlist
    fraction, or within 0.05 of it, on synthetic pools of 20k and 100k at first-stage Spearman 0.6 to 0.97; the
    grid is in benchmarks/retrieval.md). Several rankings retrieved at once: ``union``, the expected size of the union
    of their top k's (default k), takes k's place, and the target is the union's bound (:func:`union_recall_bound`)."""
    if budget >= n:
        return n
    union = k if union is None else union
    share = max(0, min(budget - union, (budget * 3) // 5))  # the sample's 60 %
    cap = max(share, budget - 2 * union)
    allowed = int(math.floor((1 - target) * k))

    def certifies(m: int) -> bool:
        s = budget - m
        if s <= 0:
            return False
        beaters = hypergeometric_upper(n - m, s, 0, delta)
        return beaters <= allowed if rankings == 1 else union_recall_bound(beaters, k, union, rankings) >= target

    lo, hi = 0, cap  # the smallest sample size that certifies, if any, by bisection (monotone in the sample size)
    if not certifies(budget - cap):
        return budget - share
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if certifies(budget - mid):
            hi = mid
        else:
            lo = mid
    return budget - hi


def union_recall_bound(beaters: int, k: int, found: int, rankings: int = 1) -> float:
    """The recall bound on the union of each of ``rankings`` rankings' true top ``k`` when at most ``beaters``
    unscored examples reach any ranking's threshold and the union of each ranking's top k among the scored holds
    ``found`` examples. Every true member missed is such a beater (at most U), and each ranking's top k found holds
    as many examples outside its true top k as it misses of it (at most U), so at least h = max(k − U, found −
    rankings·U) of the found are true members and recall ≥ h / (h + U). One ranking: 1 − min(U, k) / k."""
    if rankings == 1:
        return 1.0 - min(beaters, k) / k
    held = max(k - beaters, found - rankings * beaters, 0)
    return held / (held + beaters) if held else 0.0


def best_certifiable(n: int, k: int, budget: int, delta: float = 0.05, *, rankings: int = 1,
                     union: int | None = None) -> float:
    """The highest recall ``budget`` exact scores can certify for the top ``k`` of ``n`` at confidence 1 − ``delta``,
    even with a perfect first stage: its top k scored, the rest of the budget a uniform sample that finds nothing
    above the threshold. Several rankings retrieved at once: the shortlist is their true union, of ``union``
    examples, and the bound :func:`union_recall_bound`."""
    if budget >= n:
        return 1.0
    union = k if union is None else union
    return union_recall_bound(hypergeometric_upper(n - union, max(budget - union, 0), 0, delta), k, union, rankings)


def minimum_budget(n: int, k: int, delta: float = 0.05, recall: float = 0.95) -> int:
    """The fewest exact scores that can certify ``recall`` for the top ``k`` of ``n`` (:func:`best_certifiable`; a
    lower bound for any first stage: about k + (n − k)·(1 − δ^(1/(a + 1))), a = ⌊(1 − recall)·k⌋ the misses allowed)."""
    if best_certifiable(n, k, k, delta) >= recall - 1e-12:
        return k
    lo, hi = k, n  # best_certifiable(lo) falls short, best_certifiable(n) = 1; bisect on the monotone bound
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if best_certifiable(n, k, mid, delta) >= recall - 1e-12 else (mid, hi)
    return hi


def _strata_edges(m: int, n: int, strata: int | Sequence[int] | None, design: str, k: int = 1) -> list[int]:
    """First-stage rank boundaries of the strata of [m, n): one for uniform; for stratified, ``strata`` as
    rank boundaries, or a count H: the first stratum the size of the shortlist (at least k: a refined shortlist of
    prescored examples leaves M = 0), each next one 4× the one before, the last taking what remains."""
    if design == "uniform":
        return [m, n]
    if strata is None:
        strata = 2
    if isinstance(strata, (int, np.integer)):
        if strata < 1:
            raise RetrievalError(f"strata must be >= 1, got {strata}")
        edges, size = [m], max(m, k, 1)
        for _ in range(int(strata) - 1):
            if edges[-1] + size >= n:
                break
            edges.append(edges[-1] + size)
            size *= 4
        return edges + [n]
    inner = sorted(int(e) for e in strata)
    if any(e <= m or e >= n for e in inner):
        raise RetrievalError(f"strata boundaries must lie strictly between the shortlist size {m} and N = {n}: {inner}")
    return [m, *inner, n]


def _allocate(sizes: Sequence[int], total: int) -> list[int]:
    """Proportional allocation of ``total`` draws over strata (largest remainders; at most a stratum's size)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if total >= sizes.sum():
        return [int(s) for s in sizes]
    raw = total * sizes / sizes.sum()
    alloc = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - alloc), kind="stable")[: total - int(alloc.sum())]:
        alloc[i] += 1
    return [int(a) for a in np.minimum(alloc, sizes)]


def _bounds(sizes, sampled, found, delta) -> tuple[list[float], list[int]]:
    partial = [0 < s < z for z, s in zip(sizes, sampled)]
    share = delta / max(sum(partial), 1)
    deltas = [share if p else 0.0 for p in partial]
    ub = [hypergeometric_upper(z, s, c, share if p else delta) - c
          for z, s, c, p in zip(sizes, sampled, found, partial)]
    return deltas, ub


def _beats(exact: np.ndarray, tau) -> np.ndarray:
    """Which rows reach the threshold: ``[m]`` against τ, or ``[m, C]`` reaching any ranking's τ_c."""
    reach = exact >= tau
    return reach if reach.ndim == 1 else reach.any(axis=1)


def union_top(exact: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top ``k`` of ``exact`` ``[m]``, best first; of ``[m, C]``: the union of each column's top k,
    ordered by the best rank in any column (then the worst)."""
    from .stability import _top_and_ranks

    if exact.ndim == 1:
        return np.argsort(-exact, kind="stable")[:k]
    ranks = np.stack([_top_and_ranks(column, 0)[1] for column in exact.T], axis=1)
    members = np.flatnonzero(ranks.min(axis=1) < k)
    return members[np.lexsort((ranks[members].max(axis=1), ranks[members].min(axis=1)))]


def _projected_draws(sizes, alloc, found, extra: int) -> tuple[list[int], list[int]]:
    """(draws, beaters found) per stratum if ``extra`` more draws were added (proportionally to each stratum's size)
    and they found examples above the threshold at this sample's rate: the bound on them estimates what more budget
    would buy."""
    more = _allocate([z - s for z, s in zip(sizes, alloc)], max(extra, 0))
    new = [s + e for s, e in zip(alloc, more)]
    return new, [min(int(round(c / s * t)) if s else 0, t) for c, s, t in zip(found, alloc, new)]
