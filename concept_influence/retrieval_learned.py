"""A learned first stage for certified retrieval: a ridge regression from cheap features of every example (by default
its words, so no forward pass at all) to the exact score, fitted on the exact scores of a uniform random sample.

The sample's exact scores are part of the retrieval budget and are not wasted: they are handed to
:func:`~concept_influence.retrieval.certified_retrieval` as ``prescored`` examples, which join the shortlist. By
default the shortlist is then built in rounds (score the best-predicted batch, refit on every exact score so far),
prescored too. The bound stays exact because the first stage, the shortlist and the threshold are all fixed before the
retrieval's own sample is drawn. What the stage costs beyond exact scores is reading the texts and a few sparse ridge
fits (seconds for 80,000 chats), against a forward pass of every example for the fast path or the row encoder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import sparse
from scipy.stats import spearmanr

from .retrieval import (
    RetrievalError,
    RetrievalResult,
    call_exact_scorer,
    certified_retrieval,
    default_budget,
    default_split,
    hypergeometric_upper,
)

__all__ = ["LearnedFirstStage", "fit_first_stage", "text_features", "default_sample", "ALPHAS", "LESS_SHRINKAGE",
           "REFINE_STOP"]

#: the ridge penalties leave-one-out chooses from (scikit-learn's efficient RidgeCV on the sample)
ALPHAS = tuple(np.logspace(-3, 3, 13))
#: the penalty used is the leave-one-out choice over this (one step of :data:`ALPHAS`): leave-one-out error is the
#: bulk's, and the top needs less shrinkage. On three real pools (20k demo, 20k and 80k emergent; 30 samples each) it
#: put more of the true top k in the shortlist on average (0.96 instead of 0.93 at 80k; worst 0.71 instead of 0.38)
LESS_SHRINKAGE = float(np.sqrt(10))
#: refinement stops after a batch that puts at most this share of its examples above the k-th best exact score
REFINE_STOP = 0.05


def _texts(examples: Sequence) -> list[list[str]]:
    """Columns of text: [prompt, response] of chats (:class:`ChatExample`), or one column of strings."""
    from .data import plain_prompt_text

    if all(isinstance(e, str) for e in examples):
        return [list(examples)]
    try:
        return [[plain_prompt_text(e.prompt_messages) for e in examples], [e.response for e in examples]]
    except AttributeError as err:
        raise RetrievalError(f"text_features takes strings or chats (prompt_messages and response); got "
                             f"{type(examples[0]).__name__}") from err


def text_features(examples: Sequence) -> sparse.csr_matrix:
    """``[N, F]`` TF-IDF features of word unigrams and bigrams (sublinear counts, words seen in at least two examples;
    scikit-learn's ``TfidfVectorizer``) of each chat's prompt and response side by side, or of each string."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(examples) < 2:
        raise RetrievalError(f"text_features needs at least two examples, got {len(examples)}")
    blocks = []
    for column in _texts(examples):
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        try:
            blocks.append(vectorizer.fit_transform(column))
        except ValueError:  # a column with no word in two examples (e.g. every prompt empty) adds nothing
            continue
    if not blocks:
        raise RetrievalError("text_features found no word used by at least two examples")
    return sparse.hstack(blocks).tocsr()


def default_sample(budget: int) -> int:
    """How many of ``budget`` exact scores the learned stage's uniform sample takes by default: 10 % (at least 10).
    With the refined shortlist of :meth:`LearnedFirstStage.retrieve` a first fit only has to start the rounds, and
    every exact score the sample spends is one fewer for the certificate: of 5 / 10 / 20 % on four real pools
    (benchmarks/retrieval-learned.md) 10 % was within 0.015 of the best median certificate on each, and 5 % failed
    badly more often."""
    return max(10, round(0.1 * budget))


def _target(values: np.ndarray) -> np.ndarray:
    """The regression target: asinh of the scores over their median magnitude, per ranking (influence scores are
    heavy-tailed; the transform is monotone, so the ranking is the exact scores')."""
    scale = np.median(np.abs(values), axis=0)
    return np.arcsinh(values / np.where(scale > 0, scale, 1.0))


def _ranking(predicted: np.ndarray) -> np.ndarray:
    """The first stage's scores from the ridge's predictions: ``[N]``, or for ``[N, C]`` (several rankings) their
    union (:func:`~concept_influence.stability.union_ranking`: each example by its best place in any)."""
    from .stability import union_ranking

    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.ndim == 2 and predicted.shape[1] > 1:
        return union_ranking(*predicted.T)
    return predicted.reshape(-1)


@dataclass
class LearnedFirstStage:
    """A fitted learned first stage: ``scores`` [N] (higher = predicted higher exact score; with several exact
    rankings, the union of the predicted ones), the uniform ``sample`` it was fitted on with its ``exact`` scores
    ([s] or [s, C]), the ridge penalty chosen, and the Spearman correlation of held-out predictions with the exact
    scores on the sample (k-fold; the lowest over the rankings): what to expect of its ranking of the rest."""

    scores: np.ndarray
    sample: np.ndarray
    exact: np.ndarray
    alpha: float
    heldout_spearman: float
    seconds: dict[str, float] = field(default_factory=dict)
    features: object = field(default=None, repr=False)  # [N, F], for the refits of ``retrieve(refine=True)``
    rounds: list[tuple[int, int]] = field(default_factory=list)  # the last refined retrieval's rounds

    def retrieve(self, exact_scorer: Callable[[np.ndarray], Sequence[float]], k: int, delta: float = 0.05,
                 budget: int | None = None, *, refine: bool = True, batch: int | None = None,
                 stop: float | str = REFINE_STOP, target: float = 0.95, **options) -> RetrievalResult:
        """:func:`certified_retrieval` with this stage's scores and its sample as prescored examples; ``budget``
        counts the sample (default 10 % of N).

        ``refine`` (the default) builds the shortlist in rounds instead of taking the first fit's top M at once: the
        ``batch`` best-predicted examples not yet scored are scored exactly, the ridge is refitted on every exact
        score so far (the penalty stays the sample's), and so on, until the shortlist has the size
        :func:`default_split` would give it (leaving at least one exact score to the sample) or a batch puts at most
        ``stop`` of its examples above the k-th best exact score found before it (``stop="bound"``: no more than the
        next batch would cost the certificate, :meth:`_stop_level`); what is left of the budget goes to the uniform
        sample of the rest. ``batch``: default k/4, and at least 2/``stop``, so that a batch that stops the rounds
        has seen enough examples to mean it (a batch of seven holding none is no evidence). The rounds are
        all decided before that sample is drawn, so they are prescored examples and the bound is unchanged. They are
        recorded in :attr:`rounds` (examples scored, how many beat the k-th best before them)."""
        if not refine:
            return certified_retrieval(self.scores, exact_scorer, k, delta, budget,
                                       prescored=(self.sample, self.exact), target=target, **options)
        if self.features is None:
            raise RetrievalError("refine=True refits on the stage's features, and this stage has none: fit it with "
                                 "fit_first_stage, or pass refine=False")
        if "shortlist" in options:
            raise RetrievalError("the refined shortlist is built in rounds; pass refine=False to give M")
        n = len(self.scores)
        budget = default_budget(n, k) if budget is None else budget
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not len(self.sample) < budget:
            raise RetrievalError(f"budget must be an integer above the stage's sample of {len(self.sample)}, "
                                 f"got {budget!r}")
        if not (stop == "bound" or isinstance(stop, (int, float)) and not isinstance(stop, bool) and 0 <= stop < 1):
            raise RetrievalError(f"stop must be a share in [0, 1) or 'bound', got {stop!r}")
        floor = math.ceil(2 / stop) if stop != "bound" and stop > 0 else 1
        batch = max(k // 4, floor) if batch is None else batch
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise RetrievalError(f"batch must be a positive integer, got {batch!r}")
        budget = int(min(budget, n))
        known, exact, scores = self.sample, self.exact, self.scores
        # at least one exact score is left to the certificate's sample: a budget of N (or one that k alone fills)
        # would otherwise let the rounds prescore the whole budget, which certified_retrieval refuses
        allowance = min(default_split(n - len(known), k, budget - len(known), delta, target,
                                      **self._union_size(k, n)), budget - len(known) - 1)
        self.rounds = []
        while allowance > 0:
            unscored = np.setdiff1d(np.arange(n), known)
            chosen = np.sort(unscored[np.argsort(-scores[unscored], kind="stable")[:min(batch, allowance)]])
            got = call_exact_scorer(exact_scorer, chosen)
            kth = np.sort(exact, axis=0)[::-1][k - 1] if len(exact) >= k else -np.inf  # each ranking's
            beat = int(np.any((got > kth).reshape(len(got), -1), axis=1).sum())
            known, exact, allowance = np.concatenate([known, chosen]), np.concatenate([exact, got]), allowance - len(chosen)
            self.rounds.append((len(chosen), beat))
            if allowance <= 0 or beat <= self._stop_level(stop, len(chosen), n - len(known), budget - len(known),
                                                          min(batch, allowance), delta):
                break
            scores = self._predict(known, exact)
        return certified_retrieval(scores, exact_scorer, k, delta, budget, shortlist=max(k - len(known), 0),
                                   prescored=(known, exact), target=target, **options)

    @staticmethod
    def _stop_level(stop: float | str, scored: int, unscored: int, sample: int, following: int,
                    delta: float) -> float:
        """How many beaters a batch of ``scored`` may hold and still end the rounds. A share: ``stop`` of the batch.
        ``"bound"``: what the following batch of ``following`` exact scores would add to the certificate's count of
        possible misses by coming out of the sample (its zero-hit bound, :func:`hypergeometric_upper`, on the
        ``unscored`` examples with ``sample`` of them drawn, and after), so the rounds go on while a batch finds more
        of the top than the sample would lose by paying for the next one; no threshold to tune."""
        if stop != "bound":
            return stop * scored
        after = sample - following
        if after <= 0:
            return math.inf
        return (hypergeometric_upper(unscored - following, after, 0, delta)
                - hypergeometric_upper(unscored, sample, 0, delta))

    def _union_size(self, k: int, n: int) -> dict:
        """With several rankings, the split's view of the union of their top k's: its size estimated from the
        uniform sample (the share of it above any ranking's top-k/N quantile there, times N; between k and C·k)."""
        if self.exact.ndim == 1:
            return {}
        quantiles = np.quantile(self.exact, 1 - k / n, axis=0)
        share = float(np.mean((self.exact >= quantiles).any(axis=1)))
        rankings = self.exact.shape[1]
        return {"rankings": rankings, "union": int(min(max(round(share * n), k), rankings * k))}

    def _predict(self, indices: np.ndarray, exact: np.ndarray) -> np.ndarray:
        """The ridge (this stage's penalty) refitted on ``exact`` scores of ``indices``, predicting every example."""
        from sklearn.linear_model import Ridge

        return _ranking(Ridge(alpha=self.alpha).fit(self.features[indices], _target(exact)).predict(self.features))


def fit_first_stage(features, exact_scorer: Callable[[np.ndarray], Sequence[float]], sample: int,
                    seed: int | np.random.Generator | None = 0, folds: int = 5) -> LearnedFirstStage:
    """Score a uniform random ``sample`` of the N rows of ``features`` (``[N, F]``, dense or sparse; e.g.
    :func:`text_features`) exactly with ``exact_scorer`` (called once, with sorted indices), fit a ridge regression
    (penalty: the leave-one-out choice among :data:`ALPHAS` over :data:`LESS_SHRINKAGE`) from their features to their
    exact scores, and predict every example. An exact scorer that returns ``[m, C]`` (several rankings retrieved at
    once) gets one ridge output per ranking and the union of the predicted rankings. ``folds``: the k-fold split that
    measures the held-out Spearman."""
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    n = features.shape[0]
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or not 2 * folds <= sample < n:
        raise RetrievalError(f"sample must be an integer in [{2 * folds}, N = {n}), got {sample!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=int(sample), replace=False))
    t0 = time.perf_counter()
    exact = call_exact_scorer(exact_scorer, chosen)
    scoring = time.perf_counter() - t0
    t0 = time.perf_counter()
    x, y = features[chosen], _target(exact)
    alpha = RidgeCV(alphas=ALPHAS).fit(x, y).alpha_ / LESS_SHRINKAGE
    model = Ridge(alpha=alpha).fit(x, y)
    heldout = cross_val_predict(Ridge(alpha=alpha), x, y,
                                cv=KFold(folds, shuffle=True, random_state=int(rng.integers(2**31))))
    columns = zip(heldout.reshape(len(exact), -1).T, exact.reshape(len(exact), -1).T)
    rho = min((float(spearmanr(h, e)[0]) if np.ptp(e) > 0 else float("nan") for h, e in columns), default=np.nan)
    scores = _ranking(model.predict(features))
    return LearnedFirstStage(scores, chosen, exact, float(alpha), rho,
                             {"exact scores of the sample": scoring, "fit and predict": time.perf_counter() - t0},
                             features)
