"""The sampling arithmetic of certified retrieval (:mod:`.retrieval`): the exact hypergeometric upper bound, the
default budget and split, and what a budget can certify with a perfect first stage."""

from __future__ import annotations

import math

from scipy.stats import hypergeom

from .errors import ConceptInfluenceError

__all__ = ["RetrievalError", "hypergeometric_upper", "default_budget", "default_split", "best_certifiable",
           "minimum_budget"]


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


def default_split(n: int, k: int, budget: int, delta: float = 0.05, target: float = 0.95) -> int:
    """The default shortlist size M for a budget: the sample gets what a sample that finds *no* example above the
    threshold needs to certify recall ``target`` (uniform design, exact hypergeometric bound), up to 60 % of the
    budget, or more when the shortlist still keeps twice k (without it, a budget that a perfect first stage could
    certify the target with would not: on an 80,000-example pool with 10 % scored the 60 % sample certified 0.943 with
    every one of the top k found); the shortlist gets the rest (at least k). When the budget cannot certify the target
    even if the sample finds nothing above the threshold, the split is 40 % shortlist / 60 % sample (the best shortlist
    fraction, or within 0.05 of it, on synthetic pools of 20k and 100k at first-stage Spearman 0.6 to 0.97; the
    grid is in benchmarks/retrieval.md)."""
    if budget >= n:
        return n
    share = max(0, min(budget - k, (budget * 3) // 5))  # the sample's 60 %
    cap = max(share, budget - 2 * k)
    allowed = int(math.floor((1 - target) * k))

    def certifies(m: int) -> bool:
        s = budget - m
        return s > 0 and hypergeometric_upper(n - m, s, 0, delta) <= allowed

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


def best_certifiable(n: int, k: int, budget: int, delta: float = 0.05) -> float:
    """The highest recall ``budget`` exact scores can certify for the top ``k`` of ``n`` at confidence 1 − ``delta``,
    even with a perfect first stage: its top k scored, the rest of the budget a uniform sample that finds nothing
    above the threshold."""
    if budget >= n:
        return 1.0
    return 1.0 - min(hypergeometric_upper(n - k, max(budget - k, 0), 0, delta), k) / k


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
