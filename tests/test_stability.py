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


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="variant 'v' has"):
        check_stability(np.zeros(10), {"v": np.zeros(9)})
    with pytest.raises(ValueError, match="top must be"):
        check_stability(np.arange(10.0), {}, top=0)
