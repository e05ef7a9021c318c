"""The learned first stage and prescored examples in certified retrieval: the bound's coverage with the stage's
sample counted in the budget, the bookkeeping of prescored examples, the regression, the text features, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from concept_influence.data import ChatExample
from concept_influence.evaluation import top_k_recall
from concept_influence.retrieval import RetrievalError, array_scorer, certified_retrieval
from concept_influence.retrieval_learned import default_sample, fit_first_stage, text_features


def _linear_pool(n: int, features: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and heavy-tailed exact scores monotone in a noisy linear function of them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features))
    z = x @ rng.standard_normal(features) / np.sqrt(features) + noise * rng.standard_normal(n)
    return x, np.sign(z) * np.expm1(2 * np.abs(z))


def test_learned_stage_bound_covers_with_its_sample_in_the_budget():
    """Each repetition draws a new training sample and a new retrieval sample of one fixed pool; the stated bound
    holds in at least 1 - delta of them (less three binomial standard deviations), every exact score counted."""
    n, k, budget, delta, reps = 3000, 30, 600, 0.2, 300
    x, exact = _linear_pool(n, 8, 0.6, seed=4)
    held, bounds = [], []
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        calls: list[np.ndarray] = []
        stage = fit_first_stage(x, array_scorer(exact, calls), 60, seed=rng)
        res = stage.retrieve(array_scorer(exact, calls), k, delta, budget, shortlist=150, seed=rng, project=())
        asked = np.concatenate(calls)
        assert len(asked) == res.spent == budget and len(np.unique(asked)) == budget  # nothing scored twice
        held.append(top_k_recall(res.top, exact, k) >= res.recall_bound)
        bounds.append(res.recall_bound)
    assert np.mean(held) >= 1 - delta - 3 * np.sqrt(delta * (1 - delta) / reps)
    assert 0.3 < np.mean(bounds) < 1.0  # not trivial


def test_prescored_join_the_shortlist_and_are_not_scored_again():
    rng = np.random.default_rng(0)
    n, k = 1000, 10
    exact = rng.standard_normal(n)
    first = exact + rng.standard_normal(n)
    best = int(np.argmax(exact))
    known = np.array([best, 3, 5])
    calls: list[np.ndarray] = []
    res = certified_retrieval(first, array_scorer(exact, calls), k, 0.05, 200, shortlist=50,
                              prescored=(known, exact[known]), project=())
    assert len(calls) == 1 and not np.isin(known, calls[0]).any() and len(calls[0]) == 197
    assert res.spent == 200 and res.prescored == 3 and res.n == n and res.shortlist == 50
    assert res.top[0] == best  # a prescored example is found like any other
    fixed = np.concatenate([known, res.scored[3:53]])  # the prescored and the shortlist, fixed before the sample
    assert res.threshold == np.sort(exact[fixed])[::-1][k - 1]
    assert sum(s.size for s in res.strata) == n - 53 and sum(s.sampled for s in res.strata) == 147
    assert "3 prescored" in res.report() and res.to_json()["prescored"] == 3


@pytest.mark.parametrize("prescored, name", [
    (([1, 1], [0.0, 0.0]), "repeated"), (([5000], [0.0]), "integers in"), (([1, 2], [0.0]), "one length"),
    (([1], [np.nan]), "non-finite"), ((list(range(200)), [0.0] * 200), "whole budget")])
def test_bad_prescored_is_named(prescored, name):
    first = np.arange(1000.0)
    with pytest.raises(RetrievalError, match=name):
        certified_retrieval(first, array_scorer(first), 10, 0.05, 200, prescored=prescored)


def test_fit_first_stage_ranks_the_rest_and_states_its_held_out_accuracy():
    x, exact = _linear_pool(4000, 6, 0.2, seed=1)
    calls: list[np.ndarray] = []
    stage = fit_first_stage(x, array_scorer(exact, calls), 200, seed=3)
    assert len(calls) == 1 and np.all(np.diff(calls[0]) > 0) and len(calls[0]) == 200
    np.testing.assert_array_equal(stage.sample, calls[0])
    np.testing.assert_array_equal(stage.exact, exact[stage.sample])
    rest = np.setdiff1d(np.arange(4000), stage.sample)
    rho = spearmanr(stage.scores[rest], exact[rest])[0]
    assert rho > 0.9 and abs(stage.heldout_spearman - rho) < 0.05  # the held-out estimate says what the rest gets
    with pytest.raises(RetrievalError, match="sample must be"):
        fit_first_stage(x, array_scorer(exact), 4000)
    with pytest.raises(RetrievalError, match="non-finite"):
        fit_first_stage(x, lambda i: np.full(len(i), np.nan), 50)


def test_text_features_of_chats_and_strings():
    chats = [ChatExample(f"c{i}", ({"role": "user", "content": f"my {w} hurts"},
                                   {"role": "assistant", "content": f"rest your {w} today"}))
             for i, w in enumerate(["knee", "knee", "back", "back"])]
    x = text_features(chats)
    assert x.shape[0] == 4 and x.shape[1] > 0
    np.testing.assert_allclose(x[0].toarray(), x[1].toarray())  # the same words, the same row
    assert np.abs(x[0].toarray() - x[2].toarray()).max() > 0
    assert text_features(["red blue", "red green", "blue green"]).shape[0] == 3
    with pytest.raises(RetrievalError, match="at least two"):
        text_features(["alone"])
    with pytest.raises(RetrievalError, match="strings or chats"):
        text_features([1, 2])


def test_default_sample_spares_the_certificate():
    assert default_sample(80_000, 800, 8_000) == 800  # 0.95 still certifiable with 90 % of the budget
    assert default_sample(20_000, 200, 2_000) == 600  # not certifiable at all: a better ranking instead
