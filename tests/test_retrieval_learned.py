"""The learned first stage and prescored examples in certified retrieval: the bound's coverage with the stage's
sample (and its refined shortlist) counted in the budget, the bookkeeping of prescored examples and of the rounds, the
regression, the text features, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from concept_influence.data import ChatExample
from concept_influence.evaluation import top_k_recall
from concept_influence.retrieval import RetrievalError, array_scorer, certified_retrieval
from concept_influence.retrieval_learned import REFINE_STOP, default_sample, fit_first_stage, text_features


def _linear_pool(n: int, features: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and heavy-tailed exact scores monotone in a noisy linear function of them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features))
    z = x @ rng.standard_normal(features) / np.sqrt(features) + noise * rng.standard_normal(n)
    return x, np.sign(z) * np.expm1(2 * np.abs(z))


@pytest.mark.parametrize("refine", [True, False])
def test_learned_stage_bound_covers_with_its_sample_in_the_budget(refine):
    """Each repetition draws a new training sample and a new retrieval sample of one fixed pool; the stated bound
    holds in at least 1 - delta of them (less three binomial standard deviations), every exact score counted: with
    the shortlist refined in rounds (each round's exact scores chosen from the ones before) and with the first fit's
    top M at once."""
    n, k, budget, delta, reps = 3000, 30, 600, 0.2, 300
    x, exact = _linear_pool(n, 8, 0.6, seed=4)
    held, bounds = [], []
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        calls: list[np.ndarray] = []
        stage = fit_first_stage(x, array_scorer(exact, calls), 60, seed=rng)
        options = {} if refine else dict(refine=False, shortlist=150)
        res = stage.retrieve(array_scorer(exact, calls), k, delta, budget, seed=rng, project=(), **options)
        asked = np.concatenate(calls)
        assert len(asked) == res.spent == budget and len(np.unique(asked)) == budget  # nothing scored twice
        assert len(calls) == (2 + len(stage.rounds) if refine else 2)
        held.append(top_k_recall(res.top, exact, k) >= res.recall_bound)
        bounds.append(res.recall_bound)
    assert np.mean(held) >= 1 - delta - 3 * np.sqrt(delta * (1 - delta) / reps)
    assert 0.3 < np.mean(bounds) < 1.0  # not trivial


def test_refined_rounds_score_the_best_predicted_and_stop_when_a_batch_adds_little():
    """Each round scores the batch the fit before it ranks highest among the unscored; the rounds end at the first
    batch with at most ``stop`` of it above the k-th best exact score before it, or when the shortlist's allowance
    (:func:`default_split`) is spent; the prescored examples are the sample and every round; the rest is the sample."""
    from concept_influence.retrieval import default_split

    n, k, budget = 4000, 40, 800
    x, exact = _linear_pool(n, 6, 0.4, seed=2)
    calls: list[np.ndarray] = []
    stage = fit_first_stage(x, array_scorer(exact, calls), 80, seed=1)
    first = stage.scores.copy()
    res = stage.retrieve(array_scorer(exact, calls), k, 0.05, budget, batch=10, project=())
    rounds = stage.rounds
    assert [size for size, _ in rounds] == [len(c) for c in calls[1:-1]] and all(s <= 10 for s, _ in rounds)
    unscored = np.setdiff1d(np.arange(n), stage.sample)
    np.testing.assert_array_equal(calls[1], np.sort(unscored[np.argsort(-first[unscored])[:10]]))
    known = np.concatenate(calls[:-1])
    for (size, above), got, before in zip(rounds, calls[1:-1], np.cumsum([80] + [s for s, _ in rounds])[:-1]):
        kth = np.sort(exact[known[:before]])[::-1][k - 1] if before >= k else -np.inf
        assert above == int((exact[got] > kth).sum())
    allowance = default_split(n - 80, k, budget - 80)
    last_size, last_above = rounds[-1]
    assert last_above <= REFINE_STOP * last_size or sum(s for s, _ in rounds) == allowance
    assert all(above > REFINE_STOP * size for size, above in rounds[:-1])
    assert res.prescored == len(known) and res.shortlist == max(k - len(known), 0) and res.spent == budget
    assert sum(s.sampled for s in res.strata) == budget - len(known)


def test_bound_stop_goes_on_while_a_batch_finds_more_than_the_next_costs_the_sample():
    """``stop="bound"``: every round but the last found more of the top than the next batch would add to the sample's
    zero-hit count of possible misses (recomputed here from the hypergeometric bound), and the last found no more, or
    the allowance was spent; the result is certified like any other, every exact score counted."""
    from concept_influence.retrieval import default_split, hypergeometric_upper

    n, k, budget, batch, delta = 6000, 60, 1500, 15, 0.05
    x, exact = _linear_pool(n, 6, 0.5, seed=3)
    calls: list[np.ndarray] = []
    stage = fit_first_stage(x, array_scorer(exact, calls), 100, seed=0)
    res = stage.retrieve(array_scorer(exact, calls), k, delta, budget, batch=batch, stop="bound", project=())
    allowance = default_split(n - 100, k, budget - 100)
    scored = 100
    levels = []
    for size, _ in stage.rounds:
        scored += size
        following = min(batch, allowance - (scored - 100))
        sample = budget - scored
        levels.append(hypergeometric_upper(n - scored - following, sample - following, 0, delta)
                      - hypergeometric_upper(n - scored, sample, 0, delta) if following > 0 else None)
    assert len(stage.rounds) > 1
    assert all(above > level for (_, above), level in zip(stage.rounds[:-1], levels[:-1]))
    assert levels[-1] is None or stage.rounds[-1][1] <= levels[-1]
    assert res.spent == budget == len(np.unique(np.concatenate(calls)))


def test_refining_finds_more_of_the_top_than_one_fit():
    """Where one fit on a small sample ranks the top poorly (scores that rise with a feature the fit barely sees),
    the rounds, refitted on the high scores they find, put more of the true top k in the shortlist."""
    n, k, budget = 5000, 50, 1000
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 20))
    z = 0.3 * x[:, 0] + np.where(x[:, 1] > 1.5, 3 * x[:, 1], 0) + 0.3 * rng.standard_normal(n)
    found = {True: [], False: []}
    for refine in (True, False):
        for rep in range(10):
            stage = fit_first_stage(x, array_scorer(z), 100, seed=rep)
            options = {} if refine else dict(refine=False)
            res = stage.retrieve(array_scorer(z), k, 0.05, budget, seed=rep, project=(), **options)
            found[refine].append(top_k_recall(res.top, z, k))
    assert np.mean(found[True]) > np.mean(found[False])


def test_refined_stratified_sample_starts_with_a_stratum_of_k():
    """A refined shortlist leaves M = 0 of the rest; the stratified design's first stratum is then k ranks, not 1."""
    x, exact = _linear_pool(3000, 6, 0.3, seed=5)
    stage = fit_first_stage(x, array_scorer(exact), 60, seed=0)
    res = stage.retrieve(array_scorer(exact), 30, 0.05, 600, design="stratified", project=())
    assert res.shortlist == 0 and res.strata[0].stop - res.strata[0].start == 30
    assert res.spent == 600 and 0 <= res.recall_bound <= 1


@pytest.mark.parametrize("budget", [3000, 5000, 35])
def test_refined_rounds_leave_the_sample_at_least_one_score(budget):
    """A budget of N or more (the rounds could prescore everything) or one that k alone nearly fills: the rounds stop
    one exact score short of the budget (one batch of N takes the whole allowance), so the certificate still runs;
    with every example scored it is exact."""
    n, k = 3000, 30
    x, exact = _linear_pool(n, 6, 0.3, seed=7)
    calls: list[np.ndarray] = []
    stage = fit_first_stage(x, array_scorer(exact, calls), 20, seed=0)
    res = stage.retrieve(array_scorer(exact, calls), k, 0.05, budget, batch=n, project=())
    asked = np.concatenate(calls)
    assert len(np.unique(asked)) == len(asked) == res.spent == min(budget, n)
    assert sum(s for s, _ in stage.rounds) == min(budget, n) - 20 - 1
    if budget >= n:
        assert res.recall_bound == 1.0 and top_k_recall(res.top, exact, k) == 1.0


def test_refine_input_is_named():
    x, exact = _linear_pool(500, 4, 0.2, seed=0)
    stage = fit_first_stage(x, array_scorer(exact), 20, seed=0)
    with pytest.raises(RetrievalError, match="refine=False to give M"):
        stage.retrieve(array_scorer(exact), 5, budget=100, shortlist=10)
    with pytest.raises(RetrievalError, match="batch must be"):
        stage.retrieve(array_scorer(exact), 5, budget=100, batch=0)
    with pytest.raises(RetrievalError, match="stop must be a share in \\[0, 1\\) or 'bound', got 'never'"):
        stage.retrieve(array_scorer(exact), 5, budget=100, stop="never")
    with pytest.raises(RetrievalError, match="above the stage's sample of 20"):
        stage.retrieve(array_scorer(exact), 5, budget=20)
    stage.features = None
    with pytest.raises(RetrievalError, match="has none"):
        stage.retrieve(array_scorer(exact), 5, budget=100)


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


def test_default_sample_is_a_tenth_of_the_budget():
    assert default_sample(8_000) == 800 and default_sample(2_000) == 200 and default_sample(30) == 10
