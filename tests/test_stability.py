"""The stability check: the top of a ranking compared with its variants."""

import numpy as np
import pytest

from concept_influence.stability import check_stability


def test_a_ranking_and_its_monotone_variants_are_stable():
    rng = np.random.default_rng(0)
    chosen = rng.normal(size=200)
    report = check_stability(chosen, {"x10": 10 * chosen + 3, "noisy": chosen + 0.05 * rng.normal(size=200)})
    assert report.stable and report.warning() is None
    assert report.top == 10 and report.agreement["x10"] == 1.0 and report.spearman["x10"] == pytest.approx(1.0)


def test_an_inverted_part_is_named_in_one_warning_line():
    rng = np.random.default_rng(1)
    chosen = rng.normal(size=400)
    report = check_stability(chosen, {"part base": -chosen, "damping x100": chosen}, name="ci", top=20,
                             kinds={"part base": "part", "damping x100": "damping"})
    assert not report.stable and report.disagreeing == ["part base"]
    line = report.warning()
    assert "\n" not in line and "part base (part: 0.00)" in line and "top 20 of ci" in line
    assert report.to_dict()["warning"] == line
    assert "NOT stable" in report.format()


def test_a_ranking_that_misses_the_other_ones_top_disagrees():
    """The failure of the family's held-out designs: the behaviour's own ranking finds planted examples the concept's
    ranking leaves in its middle, while the concept's own top also sits high in the behaviour's ranking. Counted
    one way (the chosen top in the other's top) they agree; both ways they do not."""
    n = 400
    chosen = np.linspace(1.0, 0.0, n)  # example i is the chosen ranking's i-th
    behaviour = chosen.copy()
    behaviour[200:220] = 2.0  # its top 20: examples the chosen ranking puts at 200..219
    report = check_stability(chosen, {"classic": behaviour}, top=20, kinds={"classic": "behaviour"})
    forward = np.mean(np.argsort(np.argsort(-behaviour))[:20] < 80)  # the chosen top 20 within the other's top 80
    assert forward == 1.0 and report.agreement["classic"] == 0.0 and not report.stable
    assert "within the top 20%" in report.warning()


def test_agreement_is_about_the_reach_for_an_unrelated_ranking():
    rng = np.random.default_rng(2)
    shares = [check_stability(rng.normal(size=2000), {"v": rng.normal(size=2000)}).agreement["v"] for _ in range(20)]
    assert 0.1 < np.mean(shares) < 0.2  # the smaller of two shares of about 0.2 each


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="variant 'v' has"):
        check_stability(np.zeros(10), {"v": np.zeros(9)})
    with pytest.raises(ValueError, match="top must be"):
        check_stability(np.arange(10.0), {}, top=0)
    with pytest.raises(ValueError, match="reach must be"):
        check_stability(np.arange(10.0), {}, reach=0)


def test_the_union_ranks_each_example_by_its_best_place_in_either_ranking():
    from concept_influence.stability import union_ranking

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(size=200)
    union = union_ranking(a, b)
    top = set(np.argsort(-union)[:20])
    assert set(np.argsort(-a)[:10]) | set(np.argsort(-b)[:10]) <= top  # each ranking's top 10 within the union's 20
    assert len(set(union.tolist())) == 200  # ties in the best place broken by the other place
    order = np.argsort(-union)
    best = np.maximum(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))
    assert (np.diff(best[order]) <= 0).all()  # ordered by the best place
    np.testing.assert_array_equal(np.argsort(union_ranking(a)), np.argsort(a))  # one ranking: itself
    with pytest.raises(ValueError, match="one score per example"):
        union_ranking(a, b[:10])
