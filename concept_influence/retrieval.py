"""Certified retrieval: the top k of a large corpus by an exact (expensive) score, from a cheap first stage, with a
one-sided confidence bound on the recall of what was found.

Given a first-stage score for every example (the gradient index, the fast path, any array), an exact scorer and a
budget B of exact scores, :func:`certified_retrieval`

1. scores exactly the **shortlist**: the top M of the first stage (M ≥ k);
2. scores exactly a **random sample** of the other N − M examples, without replacement, uniformly or stratified by
   first-stage rank (each stratum sampled uniformly, so every inclusion probability is known: n_h / N_h);
3. returns the top k by exact score among everything scored, and an upper confidence bound Ū on the number of
   examples that were *not* scored and whose exact score reaches τ, the k-th best exact score **within the
   shortlist**. Every true top-k example that was missed is such an example, so recall ≥ 1 − Ū / k with
   confidence 1 − δ.

The bound. τ depends only on the shortlist, which the first stage fixes before anything is sampled, so for each
stratum h the number D_h of its examples with exact score ≥ τ is a fixed number and the count c_h of them in its
uniform sample of n_h out of N_h is hypergeometric(N_h, D_h, n_h). The exact one-sided (1 − δ_h) upper bound
D̄_h = max{D : P(Hypergeom(N_h, D, n_h) ≤ c_h) > δ_h} (test inversion; the CDF falls with D) holds with probability
≥ 1 − δ_h; with δ split equally over the strata that are sampled in part (a union bound), Ū = Σ_h (D̄_h − c_h)
bounds the unscored examples at or above τ in all strata at once with probability ≥ 1 − δ. A true top-k example
that is not returned was not scored (a scored one ranks at least as high among the scored as in the corpus), and
its score is ≥ the k-th of the corpus ≥ τ (the shortlist alone holds k scores ≥ τ): so at most Ū of the true top
k are missed. (Taking τ from the shortlist, not from the sample, is what keeps D_h fixed; the k-th best found is
≥ τ, so its unscored "beaters" are counted too.)

Examples scored before the call (``prescored``: e.g. the uniform sample a learned first stage
(:mod:`.retrieval_learned`) was fitted on) join the shortlist: the argument needs only that the shortlist and τ are
fixed before the sample is drawn, and the sample is then drawn from the examples that neither holds.

Several rankings at once (an exact scorer that returns ``[m, C]``: e.g. a run's Concept Influence and the
behaviour's own ranking, whose union the audit answers with): each ranking has its threshold τ_c (its k-th best in
the shortlist), an unscored example "beats" when it reaches any τ_c, one sample bounds the beaters of all C, and the
answer is the union of each ranking's top k among the scored, with a bound on its recall of the union of the true
top k's (:func:`~.retrieval_bounds.union_recall_bound`).

What a budget can certify: a stratum where the sample finds no example ≥ τ still bounds its unscored part by
about N_h · ln(1/δ_h) / n_h, so certifying recall r needs a sample of about ln(1/δ) · (N − M) / ((1 − r) · k)
exact scores even when the first stage is perfect (:func:`minimum_budget`: 4,920 of 20,000 at k = N/100, r = 0.95,
δ = 0.05; 6,647 of 100,000).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .retrieval_bounds import (
    RetrievalError,
    _allocate,
    _beats,
    _bounds,
    _projected_draws,
    _strata_edges,
    best_certifiable,
    default_budget,
    default_split,
    hypergeometric_upper,
    minimum_budget,
    union_recall_bound,
    union_top,
)
from .retrieval_scorers import array_scorer, estimator_scorer, run_examples_scorer, run_scorer

__all__ = ["certified_retrieval", "RetrievalResult", "StratumBound", "RetrievalError", "hypergeometric_upper",
           "default_split", "default_budget", "best_certifiable", "minimum_budget", "array_scorer", "estimator_scorer",
           "run_scorer", "run_examples_scorer", "union_recall_bound", "union_top", "DESIGNS"]

DESIGNS = ("uniform", "stratified")


@dataclass
class StratumBound:
    """One stratum of the examples outside the shortlist (and the prescored): first-stage ranks ``[start, stop)``
    among the examples that were not prescored (0 = best)."""

    start: int
    stop: int
    sampled: int
    beaters_sampled: int  # sampled examples with exact score >= the threshold
    delta: float  # this stratum's share of delta (0 when fully sampled or not sampled)
    beaters_bound: int  # upper bound on the unsampled examples >= the threshold

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class RetrievalResult:
    """What :func:`certified_retrieval` found and certified. Indices are positions in the first-stage array."""

    top: np.ndarray  # [k] indices of the top k by exact score among the scored, best first (C rankings: the union
    # of each one's top k, by best rank)
    top_scores: np.ndarray  # [k] their exact scores ([len(top), C] with C rankings)
    scored: np.ndarray  # every index scored exactly (shortlist, then sample)
    exact: np.ndarray  # their exact scores, aligned with `scored` ([spent, C] with C rankings)
    k: int
    delta: float
    budget: int
    shortlist: int  # M (taken from the examples that were not prescored)
    design: str
    threshold: float | list[float]  # tau: the k-th best exact score within the shortlist (C rankings: each one's)
    strata: list[StratumBound]
    beaters_bound: int  # U: upper bound on unscored examples with exact score >= tau (any ranking's)
    recall_bound: float  # 1 - min(U, k) / k, with confidence 1 - delta (C rankings: union_recall_bound)
    projected: dict[int, float] = field(default_factory=dict)  # budget -> projected recall bound (same rates)
    prescored: int = 0  # exact scores given to the call (they join the shortlist; see certified_retrieval)

    @property
    def spent(self) -> int:
        return len(self.scored)

    @property
    def n(self) -> int:
        return sum(s.size for s in self.strata) + self.shortlist + self.prescored

    @property
    def rankings(self) -> int:
        """How many exact rankings were retrieved at once (the columns of :attr:`exact`)."""
        return 1 if self.exact.ndim == 1 else self.exact.shape[1]

    def summary(self) -> str:
        """One sentence: the recall statement."""
        what, of = ((f"the top {self.k} found have", f"of the true top {self.k}") if self.rankings == 1 else
                    (f"the union of {self.rankings} rankings' top {self.k} found ({len(self.top)} examples) has",
                     "of their true union"))
        return (f"{what} recall >= {self.recall_bound:.3f} with confidence {1 - self.delta:.3g} (at most "
                f"{self.beaters_bound} {of} missed; {self.spent} exact scores of {self.n}, "
                f"{self.spent / max(self.n, 1):.1%})")

    def report(self) -> str:
        """A markdown report: the statement, the budget spent, each stratum, and what more budget would buy."""
        lines = [f"**Certified retrieval**: {self.summary()}.", "",
                 f"- budget {self.budget} exact scores, spent {self.spent}: "
                 + (f"{self.prescored} prescored (scored before the sample: a learned stage's sample and rounds) + "
                    if self.prescored else "")
                 + f"shortlist (top {self.shortlist} of the first stage) + "
                 f"{self.spent - self.shortlist - self.prescored} sampled ({self.design})",
                 "- threshold τ (k-th best exact score in the shortlist"
                 + (" and the prescored" if self.prescored else "") + "): "
                 + ", ".join(f"{t:.6g}" for t in np.atleast_1d(self.threshold))
                 + ("" if self.rankings == 1 else " (one per ranking; an example beats when it reaches any)"
                    + f"\n- each ranking's own top {self.k}, found among the scored: recall ≥ "
                    f"{union_recall_bound(self.beaters_bound, self.k, self.k):.3f} too (each one's misses are beaters)"),
                 "", "| first-stage ranks | size | sampled | sampled ≥ τ | δ share | unsampled ≥ τ, bound |",
                 "|---|---|---|---|---|---|"]
        for s in self.strata:
            lines.append(f"| {s.start}–{s.stop - 1} | {s.size} | {s.sampled} | {s.beaters_sampled} | {s.delta:.3g} | "
                         f"{s.beaters_bound} |")
        # (several rankings: the true union's size taken as the union found)
        best = best_certifiable(self.n, self.k, self.budget, self.delta, rankings=self.rankings, union=len(self.top))
        if self.rankings == 1:
            need = minimum_budget(self.n, self.k, self.delta)
            lines += ["", f"What sampling allows: with a perfect first stage this budget certifies recall ≥ {best:.3f} "
                      f"at most; recall ≥ 0.95 needs at least {need} exact scores ({need / max(self.n, 1):.1%} of N)."]
        else:
            lines += ["", f"What sampling allows: with a perfect first stage (its shortlist the true union, taken as the "
                      f"{len(self.top)} found) this budget certifies recall ≥ {best:.3f} at most."]
        if self.projected:
            lines += ["", "What more budget would buy (projected from this sample's rates, same shortlist; an "
                      "estimate, not a certificate):", "", "| budget | projected recall bound |", "|---|---|"]
            lines += [f"| {b} ({b / max(self.budget, 1):.3g}×) | {r:.3f} |" for b, r in sorted(self.projected.items())]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"k": self.k, "delta": self.delta, "budget": self.budget, "spent": self.spent, "n": self.n,
                "shortlist": self.shortlist, "prescored": self.prescored, "design": self.design,
                "threshold": self.threshold,
                "beaters_bound": self.beaters_bound, "recall_bound": self.recall_bound,
                "strata": [asdict(s) for s in self.strata],
                "projected": {str(b): r for b, r in self.projected.items()},
                "top": [int(i) for i in self.top], "top_scores": self.top_scores.tolist()}

    def save_json(self, path) -> None:
        from pathlib import Path

        from .fileio import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1))


def certified_retrieval(first_stage, exact_scorer: Callable[[np.ndarray], Sequence[float]], k: int,
                        delta: float = 0.05, budget: int | None = None, *, shortlist: int | None = None,
                        design: str = "uniform", strata: int | Sequence[int] | None = None,
                        target: float = 0.95, seed: int | np.random.Generator | None = 0,
                        project: Sequence[float] = (1.5, 2.0, 4.0),
                        prescored: tuple[Sequence[int], Sequence[float]] | None = None) -> RetrievalResult:
    """Find the top ``k`` of N examples by exact score with at most ``budget`` exact scores, and certify their recall.

    ``first_stage``: N cheap scores (higher = more likely high), a 1-D array or a :class:`Scores` (column 0).
    ``exact_scorer``: called **once** with the sorted array of chosen indices; returns their exact scores in that
    order (:func:`estimator_scorer` wraps an estimator, :func:`array_scorer` an array). ``budget``: the number of
    exact scores (default: 10 % of N, at least k). ``shortlist``: M, how many of the first stage's top are scored
    (default :func:`default_split`). ``design``: ``"uniform"`` (the default: tighter in every benchmark) or
    ``"stratified"`` (by first-stage rank; ``strata`` = a count or the rank boundaries; default 2; the union bound
    over strata and a stratum with no example above τ costing about N_h·ln(H/δ)/n_h make it looser unless the
    examples above τ crowd into one small stratum). ``target``: the recall the default split aims to certify.
    ``project``: budget multiples for the projection of what more budget would buy. ``prescored``: (indices, exact
    scores) already computed and chosen without looking at this call's sample (e.g. the uniform sample a
    :class:`~concept_influence.retrieval_learned.LearnedFirstStage` was fitted on): they count in the budget, join the
    shortlist (τ is the k-th best of both) and are never sampled or scored again; the shortlist M and the strata are
    taken from the other examples."""
    from .scores import Scores

    values = first_stage.column(0) if isinstance(first_stage, Scores) else first_stage
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise RetrievalError(f"first_stage must be a non-empty 1-D array of scores, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise RetrievalError(f"first_stage has {int((~np.isfinite(values)).sum())} non-finite scores")
    n = len(values)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise RetrievalError(f"k must be an integer in [1, N = {n}], got {k!r}")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise RetrievalError(f"delta must be in (0, 1), got {delta!r}")
    if not 0 < target < 1:
        raise RetrievalError(f"target must be in (0, 1), got {target!r}")
    if budget is None:
        budget = default_budget(n, k)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not k <= budget:
        raise RetrievalError(f"budget must be an integer >= k = {k} (exact scores; the top k need k), got {budget!r}")
    budget = int(min(budget, n))
    if design not in DESIGNS:
        raise RetrievalError(f"design must be one of {', '.join(DESIGNS)}, got {design!r}")
    known, known_exact = _prescored(prescored, n, budget, k)
    rest = np.setdiff1d(np.arange(n), known)  # the examples the shortlist and the sample are taken from
    n_rest, budget_rest, k_rest = len(rest), budget - len(known), max(k - len(known), 0)
    m = default_split(n_rest, k, budget_rest, delta, target) if shortlist is None else shortlist
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not k_rest <= m <= budget_rest:
        raise RetrievalError(f"shortlist must be an integer in [{k_rest}, {budget_rest}] (k = {k}, budget {budget}, "
                             f"{len(known)} prescored), got {m!r}")
    m = int(m)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    order = rest[np.argsort(-values[rest], kind="stable")]  # first-stage rank among the rest -> index
    edges = _strata_edges(m, n_rest, strata, design, k)
    sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
    alloc = _allocate(sizes, budget_rest - m)
    picks = [np.sort(rng.choice(size, size=s, replace=False)) + a if s else np.zeros(0, dtype=np.int64)
             for a, size, s in zip(edges[:-1], sizes, alloc)]
    ranks = np.concatenate([np.arange(m), *picks]).astype(np.int64)  # first-stage ranks scored exactly
    chosen = order[ranks]
    call_order = np.argsort(chosen, kind="stable")
    got = call_exact_scorer(exact_scorer, chosen[call_order])
    exact = np.empty_like(got)
    exact[call_order] = got  # aligned with `chosen` (shortlist first, then each stratum's sample)
    if len(known) == 0:
        known_exact = known_exact.reshape(0, *exact.shape[1:])
    elif known_exact.shape[1:] != exact.shape[1:]:
        raise RetrievalError(f"prescored exact scores have shape {known_exact.shape[1:]} per example, the exact "
                             f"scorer returned {exact.shape[1:]}: one score per ranking in both")
    # the prescored join the shortlist: `chosen` = prescored, shortlist, then each stratum's sample
    chosen, exact, m_known = np.concatenate([known, chosen]), np.concatenate([known_exact, exact]), len(known) + m

    tau = np.sort(exact[:m_known], axis=0)[::-1][k - 1]  # each ranking's k-th best in the shortlist
    found, start = [], m_known
    for p in picks:
        found.append(int(_beats(exact[start:start + len(p)], tau).sum()))
        start += len(p)
    deltas, ub = _bounds(sizes, alloc, found, delta)
    beaters, best, rankings = int(sum(ub)), union_top(exact, k), 1 if exact.ndim == 1 else exact.shape[1]
    result = RetrievalResult(
        top=chosen[best], top_scores=exact[best], scored=chosen, exact=exact, k=k, delta=float(delta), budget=budget,
        shortlist=m, design=design, threshold=float(tau) if exact.ndim == 1 else [float(t) for t in tau],
        prescored=len(known), strata=[StratumBound(a, b, s, c, d, u) for a, b, s, c, d, u in zip(
            edges[:-1], edges[1:], alloc, found, deltas, ub)],
        beaters_bound=beaters, recall_bound=union_recall_bound(beaters, k, len(best), rankings))
    for factor in project:
        more = int(round(budget * factor))
        _, projected = _bounds(sizes, *_projected_draws(sizes, alloc, found, more - budget), delta)
        result.projected[more] = union_recall_bound(int(sum(projected)), k, len(best), rankings)
    return result


def call_exact_scorer(exact_scorer: Callable[[np.ndarray], Sequence[float]], indices: np.ndarray) -> np.ndarray:
    """``exact_scorer`` on sorted ``indices``, checked: one finite score each (``[m]``), or one per ranking
    (``[m, C]``; a single column is returned as ``[m]``)."""
    exact = np.asarray(exact_scorer(indices), dtype=np.float64)
    if exact.ndim != 2 or exact.shape[1] == 1:
        exact = exact.reshape(-1)
    if exact.shape[0] != len(indices) or exact.ndim == 2 and exact.shape[1] == 0:
        raise RetrievalError(f"exact_scorer returned scores of shape {exact.shape} for {len(indices)} indices (one "
                             f"score each, or one per ranking)")
    if not np.all(np.isfinite(exact)):
        raise RetrievalError(f"exact_scorer returned {int((~np.isfinite(exact)).sum())} non-finite scores")
    return exact


def _prescored(prescored, n: int, budget: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``prescored`` as (indices [p], exact scores [p]), checked: distinct indices in [0, N), finite scores, and
    room in the budget for at least one more exact score."""
    if prescored is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    indices, scores = (np.asarray(a) for a in prescored)
    if indices.ndim != 1 or scores.shape[:1] != indices.shape or scores.ndim not in (1, 2):
        raise RetrievalError(f"prescored must be (indices, exact scores) of one length, got shapes {indices.shape} "
                             f"and {scores.shape}")
    if len(indices) and (not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0 or indices.max() >= n):
        raise RetrievalError(f"prescored indices must be integers in [0, N = {n})")
    repeated = len(indices) - len(np.unique(indices))
    if repeated:
        raise RetrievalError(f"prescored has {repeated} repeated indices")
    if not np.all(np.isfinite(scores)):
        raise RetrievalError(f"prescored has {int((~np.isfinite(scores)).sum())} non-finite exact scores")
    if len(indices) >= budget:
        raise RetrievalError(f"prescored holds {len(indices)} exact scores, the whole budget of {budget}; raise "
                             f"the budget above it (k = {k})")
    return indices.astype(np.int64), scores.astype(np.float64)
