"""A learned first stage for certified retrieval: a ridge regression from cheap features of every example (by default
its words, so no forward pass at all) to the exact score, fitted on the exact scores of a uniform random sample.

The sample's exact scores are part of the retrieval budget and are not wasted: they are handed to
:func:`~concept_influence.retrieval.certified_retrieval` as ``prescored`` examples, which join the shortlist. The bound
stays exact because the first stage, the shortlist and the threshold are all fixed before the retrieval's own sample
is drawn. What the stage costs beyond exact scores is reading the texts and one sparse ridge fit (seconds for 80,000
chats), against a forward pass of every example for the fast path or the row encoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import sparse
from scipy.stats import spearmanr

from .retrieval import RetrievalError, RetrievalResult, best_certifiable, certified_retrieval

__all__ = ["LearnedFirstStage", "fit_first_stage", "text_features", "default_sample", "ALPHAS", "LESS_SHRINKAGE"]

#: the ridge penalties leave-one-out chooses from (scikit-learn's efficient RidgeCV on the sample)
ALPHAS = tuple(np.logspace(-3, 3, 13))
#: the penalty used is the leave-one-out choice over this (one step of :data:`ALPHAS`): leave-one-out error is the
#: bulk's, and the top needs less shrinkage. On three real pools (20k demo, 20k and 80k emergent; 30 samples each) it
#: put more of the true top k in the shortlist on average (0.96 instead of 0.93 at 80k; worst 0.71 instead of 0.38)
LESS_SHRINKAGE = float(np.sqrt(10))


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


def default_sample(n: int, k: int, budget: int, delta: float = 0.05, target: float = 0.95) -> int:
    """How many of ``budget`` exact scores the learned stage's sample takes by default: 10 % of the budget when the
    other 90 % could still certify recall ``target`` with a perfect ranking (every exact score it spends on the
    sample is one fewer for the certificate), else 30 % (nothing certifies the target; a better ranking raises the
    true recall). Of 10 / 20 / 30 % on real pools (benchmarks/retrieval-learned.md): at 80,000 chats only 10 %
    certified 0.95 (in 40 % of repetitions; more caps the certificate at 0.929), at 120,000 all three did (80–85 %),
    at 20,000 30 % found the most of the true top k. At least 10."""
    low, high = max(10, round(0.1 * budget)), max(10, round(0.3 * budget))
    return low if best_certifiable(n - low, k, budget - low, delta) >= target else high


def _target(values: np.ndarray) -> np.ndarray:
    """The regression target: asinh of the scores over their median magnitude (influence scores are heavy-tailed;
    the transform is monotone, so the ranking is the exact scores')."""
    scale = float(np.median(np.abs(values)))
    return np.arcsinh(values / (scale if scale > 0 else 1.0))


@dataclass
class LearnedFirstStage:
    """A fitted learned first stage: ``scores`` [N] (higher = predicted higher exact score), the uniform ``sample``
    it was fitted on with its ``exact`` scores, the ridge penalty chosen, and the Spearman correlation of held-out
    predictions with the exact scores on the sample (k-fold): what to expect of its ranking of the rest."""

    scores: np.ndarray
    sample: np.ndarray
    exact: np.ndarray
    alpha: float
    heldout_spearman: float
    seconds: dict[str, float] = field(default_factory=dict)

    def retrieve(self, exact_scorer: Callable[[np.ndarray], Sequence[float]], k: int, delta: float = 0.05,
                 budget: int | None = None, **options) -> RetrievalResult:
        """:func:`certified_retrieval` with this stage's scores and its sample as prescored examples; ``budget``
        counts the sample (default 10 % of N)."""
        return certified_retrieval(self.scores, exact_scorer, k, delta, budget,
                                   prescored=(self.sample, self.exact), **options)


def fit_first_stage(features, exact_scorer: Callable[[np.ndarray], Sequence[float]], sample: int,
                    seed: int | np.random.Generator | None = 0, folds: int = 5) -> LearnedFirstStage:
    """Score a uniform random ``sample`` of the N rows of ``features`` (``[N, F]``, dense or sparse; e.g.
    :func:`text_features`) exactly with ``exact_scorer`` (called once, with sorted indices), fit a ridge regression
    (penalty: the leave-one-out choice among :data:`ALPHAS` over :data:`LESS_SHRINKAGE`) from their features to their
    exact scores, and predict every example. ``folds``: the k-fold split that measures the held-out Spearman."""
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    n = features.shape[0]
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or not 2 * folds <= sample < n:
        raise RetrievalError(f"sample must be an integer in [{2 * folds}, N = {n}), got {sample!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=int(sample), replace=False))
    t0 = time.perf_counter()
    exact = np.asarray(exact_scorer(chosen), dtype=np.float64).reshape(-1)
    scoring = time.perf_counter() - t0
    if exact.shape != chosen.shape:
        raise RetrievalError(f"exact_scorer returned {exact.shape[0]} scores for {len(chosen)} indices")
    if not np.all(np.isfinite(exact)):
        raise RetrievalError(f"exact_scorer returned {int((~np.isfinite(exact)).sum())} non-finite scores")
    t0 = time.perf_counter()
    x, y = features[chosen], _target(exact)
    alpha = RidgeCV(alphas=ALPHAS).fit(x, y).alpha_ / LESS_SHRINKAGE
    model = Ridge(alpha=alpha).fit(x, y)
    heldout = cross_val_predict(Ridge(alpha=alpha), x, y,
                                cv=KFold(folds, shuffle=True, random_state=int(rng.integers(2**31))))
    rho = float(spearmanr(heldout, exact)[0]) if np.ptp(exact) > 0 else float("nan")
    scores = np.asarray(model.predict(features), dtype=np.float64).reshape(-1)
    return LearnedFirstStage(scores, chosen, exact, float(alpha), rho,
                             {"exact scores of the sample": scoring, "fit and predict": time.perf_counter() - t0})
