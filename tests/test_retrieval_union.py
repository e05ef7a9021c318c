"""Certified retrieval of several rankings at once (an exact scorer returning ``[m, C]``): the union of each ranking's
top k, the recall bound on the true union (its arithmetic, its combinatorial argument, its coverage with a plain and a
learned first stage), the run folder's union of its scores and the behaviour's own ranking, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from concept_influence.retrieval import (
    RetrievalError,
    array_scorer,
    certified_retrieval,
    union_recall_bound,
    union_top,
)
from concept_influence.retrieval_learned import fit_first_stage


def _true_union(exact: np.ndarray, k: int) -> set[int]:
    return {int(i) for c in range(exact.shape[1]) for i in np.argsort(-exact[:, c], kind="stable")[:k]}


def _union_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    truth = _true_union(exact, k)
    return len(truth & {int(i) for i in found}) / len(truth)


def _two_rankings(n: int, agree: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two heavy-tailed exact rankings that agree to ``agree`` (latent correlation), cheap features of both and a
    noisy first stage that sees the best of the two."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6))
    a = x[:, :3].sum(axis=1) / np.sqrt(3)
    b = agree * a + np.sqrt(1 - agree**2) * x[:, 3:].sum(axis=1) / np.sqrt(3)
    latent = np.stack([a, b], axis=1) + 0.3 * rng.standard_normal((n, 2))
    exact = np.sign(latent) * np.expm1(np.abs(latent))
    first = np.maximum(a, b) + 0.5 * rng.standard_normal(n)
    return x, exact, first


def test_union_recall_bound_arithmetic():
    for beaters, k in [(0, 10), (3, 10), (10, 10), (25, 10), (39, 800)]:
        assert union_recall_bound(beaters, k, k) == 1.0 - min(beaters, k) / k  # one ranking: the plain bound
    assert union_recall_bound(0, 10, 17, rankings=2) == 1.0
    assert union_recall_bound(2, 10, 18, rankings=2) == pytest.approx(14 / 16)  # found − 2U = 14 of the found are true
    assert union_recall_bound(2, 10, 10, rankings=2) == pytest.approx(8 / 10)  # k − U = 8
    assert union_recall_bound(12, 10, 15, rankings=2) == 0.0


def test_union_top_is_each_rankings_top_k_by_best_rank():
    exact = np.array([[5.0, 0.0], [4.0, 9.0], [3.0, 8.0], [0.0, 1.0], [1.0, 7.0]])
    np.testing.assert_array_equal(union_top(exact, 2), [1, 0, 2])  # ranks (1, 0), (0, 4), (2, 1)
    np.testing.assert_array_equal(union_top(exact[:, 0], 2), [0, 1])


def test_union_bound_argument_holds_with_the_exact_beater_count():
    """The combinatorial step, with no sampling: whatever is scored, if U is the true number of unscored examples
    that reach any ranking's threshold (each ranking's k-th best in the shortlist), the union of each ranking's top k
    among the scored has recall >= union_recall_bound(U) of the true union."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        n, k, rankings = int(rng.integers(20, 60)), int(rng.integers(1, 6)), int(rng.integers(2, 4))
        exact = rng.standard_normal((n, rankings)) @ rng.standard_normal((rankings, rankings))
        shortlist = rng.choice(n, size=int(rng.integers(k, n)), replace=False)
        sampled = rng.choice(np.setdiff1d(np.arange(n), shortlist), size=int(rng.integers(0, n - len(shortlist) + 1)),
                             replace=False)
        scored = np.concatenate([shortlist, sampled])
        tau = np.sort(exact[shortlist], axis=0)[::-1][k - 1]
        unscored = np.setdiff1d(np.arange(n), scored)
        beaters = int((exact[unscored] >= tau).any(axis=1).sum())
        found = scored[union_top(exact[scored], k)]
        assert _union_recall(found, exact, k) >= union_recall_bound(beaters, k, len(found), rankings) - 1e-12


@pytest.mark.parametrize("learned", [False, True])
def test_union_bound_covers_on_a_fixed_pool(learned):
    """Over repeated samples of one pool of two rankings, the stated bound on the recall of their union holds in at
    least 1 - delta of them (less three binomial standard deviations), with a fixed first stage or the learned stage
    (one ridge output per ranking, the rounds refitted on both), and one sample serving both rankings."""
    n, k, budget, delta, reps = 2500, 25, 700, 0.2, 250
    x, exact, first = _two_rankings(n, 0.3, seed=1)
    held, bounds = [], []
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        calls: list[np.ndarray] = []
        if learned:
            stage = fit_first_stage(x, array_scorer(exact, calls), 70, seed=rng)
            res = stage.retrieve(array_scorer(exact, calls), k, delta, budget, seed=rng, project=())
        else:
            res = certified_retrieval(first, array_scorer(exact, calls), k, delta, budget, shortlist=200, seed=rng,
                                      project=())
        asked = np.concatenate(calls)
        assert len(asked) == len(np.unique(asked)) == res.spent == budget and res.exact.shape == (budget, 2)
        held.append(_union_recall(res.top, exact, k) >= res.recall_bound)
        bounds.append(res.recall_bound)
    assert np.mean(held) >= 1 - delta - 3 * np.sqrt(delta * (1 - delta) / reps)
    assert 0.3 < np.mean(bounds) < 1.0  # not trivial: the union's true recall is near 1 and the bound can fail


def test_everything_scored_returns_the_true_union():
    _, exact, first = _two_rankings(400, 0.0, seed=2)
    res = certified_retrieval(first, array_scorer(exact), 10, 0.05, budget=400)
    assert res.recall_bound == 1.0 and set(res.top.tolist()) == _true_union(exact, 10) and res.rankings == 2
    assert len(res.threshold) == 2 and res.top_scores.shape == (len(res.top), 2)
    assert "union of 2 rankings' top 10 found" in res.summary() and "one per ranking" in res.report()
    assert "its shortlist the true union" in res.report()
    assert "each ranking's own top 10, found among the scored: recall ≥ 1.000 too" in res.report()


def test_prescored_must_have_one_score_per_ranking():
    _, exact, first = _two_rankings(300, 0.5, seed=3)
    with pytest.raises(RetrievalError, match=r"prescored exact scores have shape \(\) per example.*\(2,\)"):
        certified_retrieval(first, array_scorer(exact), 5, 0.05, 100, prescored=([0, 1], [1.0, 2.0]))
    with pytest.raises(RetrievalError, match="scores of shape"):
        certified_retrieval(first, lambda i: np.zeros((len(i), 0)), 5, 0.05, 100)


def test_run_folder_union_of_its_scores_and_the_behaviours_ranking(tmp_path, capsys):
    """`retrieve --run --exact-column union`: the run's estimator scores the chosen examples in both rankings (its
    scores and the behaviour's own, scored in the same pass); they equal the run's full scores and stability variant,
    and the answer is the union the run's report lists the top of."""
    from runfolder import make_project

    from concept_influence.cli import main
    from concept_influence.config import RunConfig
    from concept_influence.runs import Run, run_stages
    from concept_influence.runs.stability import variants_path
    from concept_influence.scores import Scores

    project = make_project(tmp_path / "p", n_train=40)
    run = project / "runs" / "r"
    run_stages(("probe", "factors", "scores"), run, RunConfig.read(project / "run.toml"), progress=False)
    full = Scores.load(run / "scores" / "scores.safetensors")
    behaviour = Scores.load(variants_path(Run.open(run, create=False)))
    Scores(full.ids, full.values[:, :1], "first").save(tmp_path / "first.safetensors")
    assert main(["retrieve", str(tmp_path / "first.safetensors"), "--run", str(run), "--exact-column", "union",
                 "--k", "3", "--budget", "40", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    got = Scores.load(tmp_path / "out" / "exact.safetensors")
    assert got.columns == ["score", "behaviour"] and len(got) == 40
    np.testing.assert_allclose(got.column(0), full.aligned(got.ids)[:, 0], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(got.column(1), behaviour.aligned(got.ids)[:, behaviour.column_index("behaviour")],
                               rtol=1e-4, atol=1e-8)
    import json

    data = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    exact = np.stack([full.column(0), behaviour.aligned(full.ids)[:, behaviour.column_index("behaviour")]], axis=1)
    assert set(data["ids"]) == {full.ids[i] for i in _true_union(exact, 3)} and data["recall_bound"] == 1.0
    assert "(run / behaviour)" in (tmp_path / "out" / "retrieval.md").read_text()
    assert main(["retrieve", "text", "--run", str(run), "--exact-column", "union", "--k", "3", "--budget", "30",
                 "--learn-sample", "10", "--out", str(tmp_path / "text"), "--no-progress"]) == 0
    assert Scores.load(tmp_path / "text" / "exact.safetensors").values.shape == (30, 2)
    assert main(["retrieve", str(tmp_path / "first.safetensors"), "--exact", str(tmp_path / "first.safetensors"),
                 "--exact-column", "union", "--k", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "give --run" in capsys.readouterr().err


def test_default_split_for_a_union_leaves_the_sample_what_the_union_bound_needs():
    """With several rankings the split sizes the sample for the union's bound (its size given): the smallest sample
    that certifies the target when it finds nothing, which leaves the rounds more room than one ranking's split."""
    from concept_influence.retrieval import default_split, hypergeometric_upper

    n, k, budget, union = 80_000, 800, 8_000, 1_500
    one, both = default_split(n, k, budget), default_split(n, k, budget, rankings=2, union=union)
    assert default_split(n, k, budget, rankings=1, union=k) == one and both > one
    # a union no larger than k is one ranking's rule (what certified_retrieval uses, with no sample to estimate it)
    assert default_split(n, k, budget, rankings=2, union=k) == one

    def certified(m: int) -> float:
        return union_recall_bound(hypergeometric_upper(n - m, budget - m, 0, 0.05), k, union, 2)

    assert certified(both) >= 0.95 > certified(both + 1)


def test_learned_stage_estimates_the_unions_size_from_its_sample():
    x, exact, _ = _two_rankings(20_000, 0.0, seed=4)
    stage = fit_first_stage(x, array_scorer(exact), 2_000, seed=0)
    size = stage._union_size(200, 20_000)
    assert size["rankings"] == 2 and abs(size["union"] - len(union_top(exact, 200))) < 120
    assert fit_first_stage(x, array_scorer(exact[:, 0]), 200, seed=0)._union_size(200, 20_000) == {}
