"""Certified retrieval: the recall bound's coverage, its edge cases, bad input, and what the exact scorer is asked."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
from scipy.stats import hypergeom, spearmanr

from concept_influence.evaluation import top_k_recall
from concept_influence.retrieval import (
    RetrievalError,
    array_scorer,
    best_certifiable,
    certified_retrieval,
    default_split,
    estimator_scorer,
    hypergeometric_upper,
    minimum_budget,
)


def _pool(n: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """First stage and heavy-tailed exact scores, correlated through a Gaussian copula."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    first = rho * z + np.sqrt(1 - rho * rho) * rng.standard_normal(n)
    return first, np.sign(z) * np.expm1(np.abs(z))  # heavy tails, same ranks as z


def test_hypergeometric_upper_is_the_exact_inversion():
    for pop, sample, found, delta in [(100, 10, 0, 0.05), (100, 10, 3, 0.05), (500, 100, 7, 0.1), (50, 49, 2, 0.05)]:
        ub = hypergeometric_upper(pop, sample, found, delta)
        assert hypergeom.cdf(found, pop, ub, sample) > delta  # D = ub is still plausible...
        if ub < pop - sample + found:
            assert hypergeom.cdf(found, pop, ub + 1, sample) <= delta  # ...and ub + 1 is not
    assert hypergeometric_upper(100, 100, 4, 0.05) == 4  # everything sampled: the count is known
    assert hypergeometric_upper(100, 0, 0, 0.05) == 100  # nothing sampled: anything is possible


def test_hypergeometric_upper_covers_at_a_fixed_count():
    rng = np.random.default_rng(0)
    pop, d, sample, delta = 400, 12, 40, 0.1
    items = np.zeros(pop, dtype=bool)
    items[:d] = True
    held = [hypergeometric_upper(pop, sample, int(items[rng.choice(pop, sample, replace=False)].sum()), delta) >= d
            for _ in range(2000)]
    assert np.mean(held) >= 1 - delta - 3 * np.sqrt(delta * (1 - delta) / 2000)


@pytest.mark.parametrize("design", ["uniform", "stratified"])
def test_recall_bound_covers_on_a_fixed_pool(design):
    """Over 400 samples of one pool (the guarantee is over the sampling, the pool fixed), the stated recall bound
    holds in at least 1 - delta of them, less three binomial standard deviations. delta = 0.2 so that a bound that
    failed too often would show."""
    n, k, budget, delta, reps = 2000, 40, 800, 0.2, 400
    first, exact = _pool(n, 0.9, seed=3)
    held, bounds = [], []
    for rep in range(reps):
        res = certified_retrieval(first, array_scorer(exact), k, delta, budget, shortlist=200, design=design,
                                  strata=2, seed=rep, project=())
        held.append(top_k_recall(res.top, exact, k) >= res.recall_bound)
        bounds.append(res.recall_bound)
    assert np.mean(held) >= 1 - delta - 3 * np.sqrt(delta * (1 - delta) / reps)
    assert 0.5 < np.mean(bounds) < 0.9  # not trivial: the bound is near the true recall (about 0.92) and can fail


def test_beater_count_bound_covers():
    """The count itself (unscored examples at or above the shortlist's k-th exact score) is covered, per pool."""
    n, k, delta, reps = 3000, 30, 0.2, 300
    first, exact = _pool(n, 0.9, seed=5)
    held = []
    for rep in range(reps):
        res = certified_retrieval(first, array_scorer(exact), k, delta, 400, shortlist=100, seed=rep, project=())
        unscored = np.setdiff1d(np.arange(n), res.scored)
        held.append((exact[unscored] >= res.threshold).sum() <= res.beaters_bound)
    assert np.mean(held) >= 1 - delta - 3 * np.sqrt(delta * (1 - delta) / reps)


def test_everything_scored_certifies_recall_one():
    first, exact = _pool(300, 0.3, seed=1)
    res = certified_retrieval(first, array_scorer(exact), 10, 0.05, budget=300)
    assert res.recall_bound == 1.0 and res.beaters_bound == 0 and res.spent == 300
    assert top_k_recall(res.top, exact, 10) == 1.0
    np.testing.assert_array_equal(res.top, np.argsort(-exact, kind="stable")[:10])
    np.testing.assert_allclose(res.top_scores, exact[res.top])
    # a perfect first stage with a shortlist of exactly k and the rest sampled: the sample finds nothing above
    res = certified_retrieval(exact, array_scorer(exact), 10, 0.05, budget=300, shortlist=10)
    assert res.recall_bound == 1.0


def test_exact_scorer_is_called_once_on_the_chosen_indices_only():
    first, exact = _pool(5000, 0.7, seed=2)
    calls: list[np.ndarray] = []
    res = certified_retrieval(first, array_scorer(exact, calls), 50, 0.05, budget=600, seed=7)
    assert len(calls) == 1
    asked = calls[0]
    assert len(asked) == 600 == res.spent and len(np.unique(asked)) == 600
    assert np.all(np.diff(asked) > 0)  # sorted, no repeats
    assert set(asked.tolist()) == set(res.scored.tolist())
    shortlist = np.argsort(-first, kind="stable")[: res.shortlist]
    assert set(shortlist.tolist()) <= set(asked.tolist())
    np.testing.assert_allclose(res.exact, exact[res.scored])
    assert set(res.top.tolist()) <= set(asked.tolist())
    again = certified_retrieval(first, array_scorer(exact), 50, 0.05, budget=600, seed=7)  # deterministic
    np.testing.assert_array_equal(again.scored, res.scored)
    assert again.recall_bound == res.recall_bound


def test_report_states_the_bound_budget_and_projection():
    first, exact = _pool(20000, 0.95, seed=4)
    res = certified_retrieval(first, array_scorer(exact), 200, 0.05, budget=2000)
    text = res.report()
    assert f"recall >= {res.recall_bound:.3f}" in text and "confidence 0.95" in text
    assert "spent 2000" in text and "4000 (2×)" in text
    assert res.shortlist == default_split(20000, 200, 2000) == 800  # 40 % shortlist when the target is out of reach
    assert set(res.projected) == {3000, 4000, 8000}
    assert res.projected[8000] >= res.projected[4000] >= res.projected[3000] >= 0
    js = res.to_json()
    assert js["spent"] == 2000 and js["recall_bound"] == res.recall_bound and len(js["top"]) == 200


def test_default_split_leaves_the_sample_what_it_needs():
    # 100k examples, k = 1000, budget 10 %: a sample of about 5.4k that finds nothing certifies 0.95
    m = default_split(100_000, 1000, 10_000)
    assert 4000 <= m <= 5000
    assert hypergeometric_upper(100_000 - m, 10_000 - m, 0, 0.05) <= 50
    assert hypergeometric_upper(100_000 - m - 1, 10_000 - m - 1, 0, 0.05) > 50  # the smallest such sample
    # 80k, k = 800, budget 10 %: a sample of 60 % finding nothing certifies 0.943 < 0.95; the sample gets more
    # because the shortlist still keeps twice k
    assert hypergeometric_upper(80_000 - 3200, 4800, 0, 0.05) > 40
    m = default_split(80_000, 800, 8000)
    assert 1600 <= m < 3200 and hypergeometric_upper(80_000 - m, 8000 - m, 0, 0.05) <= 40
    assert hypergeometric_upper(80_000 - m - 1, 8000 - m - 1, 0, 0.05) > 40
    assert default_split(20_000, 200, 2000) == 800  # out of reach even so: 40 % / 60 %
    assert default_split(1000, 10, 1000) == 1000
    assert default_split(1000, 100, 100) == 100  # the budget is k: all of it on the shortlist


def test_what_sampling_allows_is_what_a_perfect_first_stage_certifies():
    first, exact = _pool(20000, 0.6, seed=5)
    perfect = certified_retrieval(exact, array_scorer(exact), 200, 0.05, budget=2000, shortlist=200)
    assert perfect.strata[0].beaters_sampled == 0  # nothing above the threshold outside a perfect shortlist
    assert perfect.recall_bound == pytest.approx(best_certifiable(20000, 200, 2000)) == pytest.approx(0.845)
    for rho, m in ((0.6, None), (0.95, None), (0.95, 1000)):  # no first stage or split certifies more
        noisy, _ = _pool(20000, rho, seed=5)
        assert certified_retrieval(noisy, array_scorer(exact), 200, 0.05, budget=2000,
                                   shortlist=m).recall_bound <= perfect.recall_bound
    need = minimum_budget(20000, 200)
    assert best_certifiable(20000, 200, need) >= 0.95 > best_certifiable(20000, 200, need - 1)
    assert need == pytest.approx(200 + 19800 * (1 - 0.05 ** (1 / 11)), rel=0.01)  # k + (N − k)(1 − δ^(1/(⌊(1−r)k⌋+1)))
    assert minimum_budget(100_000, 1000) < 10_000 and minimum_budget(60_000, 600) > 6_000  # 10 % of N: from ~61k
    assert minimum_budget(50, 50) == 50 and best_certifiable(100, 10, 100) == 1.0
    assert f"needs at least {need} exact scores" in perfect.report()


@pytest.mark.parametrize("kwargs, name", [
    (dict(k=0), "k"), (dict(k=501), "k"), (dict(k=2.5), "k"),
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"), (dict(delta=-0.1), "delta"),
    (dict(budget=5), "budget"), (dict(budget=10.5), "budget"),
    (dict(shortlist=5), "shortlist"), (dict(shortlist=300), "shortlist"),
    (dict(design="importance"), "design"), (dict(target=1.0), "target"),
    (dict(design="stratified", strata=[3]), "strata"), (dict(design="stratified", strata=0), "strata"),
])
def test_bad_arguments_are_named(kwargs, name):
    first, exact = _pool(500, 0.5, seed=0)
    args = dict(k=10, delta=0.05, budget=100) | kwargs
    with pytest.raises(RetrievalError, match=rf"^{name} "):
        certified_retrieval(first, array_scorer(exact), **args)


def test_bad_first_stage_and_scorer_output():
    with pytest.raises(RetrievalError, match="first_stage"):
        certified_retrieval(np.array([1.0, np.nan, 2.0]), array_scorer(np.zeros(3)), 1, budget=2)
    with pytest.raises(RetrievalError, match="first_stage"):
        certified_retrieval(np.zeros((3, 2)), array_scorer(np.zeros(3)), 1, budget=2)
    with pytest.raises(RetrievalError, match=r"exact_scorer returned scores of shape \(1,\) for 5 indices"):
        certified_retrieval(np.arange(10.0), lambda idx: np.zeros(1), 2, budget=5)


def test_with_a_gradient_estimator_on_a_tiny_model(tl_adapter, tokenized):
    """The exact scorer is an estimator scoring only the chosen examples; its scores equal scoring everything."""
    import torch

    from concept_influence.concepts import ConceptFunction
    from concept_influence.estimators import ConceptGradDot
    from probes import ConceptDirection

    torch.manual_seed(0)
    direction = ConceptDirection(torch.randn(tl_adapter.d_model), "blocks.1.hook_resid_post", kind="custom")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:3])
    everything = ConceptGradDot(concept).score(tl_adapter, tokenized, progress=False).column(0)
    first = everything + np.random.default_rng(0).normal(0, everything.std(), len(everything))
    res = certified_retrieval(first, estimator_scorer(ConceptGradDot(concept), tl_adapter, tokenized), 2, 0.2,
                              budget=8, shortlist=4)
    np.testing.assert_allclose(res.exact, everything[res.scored], rtol=1e-4, atol=1e-7)
    assert res.spent == 8 and 0 <= res.recall_bound <= 1


def _scores_file(path, ids, values, estimator="first"):
    from concept_influence.scores import Scores

    return Scores(list(ids), np.array(values, dtype=np.float64), estimator).save(path)


def test_cli_with_exact_scores_writes_the_report(tmp_path, capsys):
    from concept_influence.cli import main
    from concept_influence.scores import Scores

    first, exact = _pool(3000, 0.9, seed=6)
    ids = [f"ex{i}" for i in range(3000)]
    _scores_file(tmp_path / "first.safetensors", ids, first)
    _scores_file(tmp_path / "exact.safetensors", ids[::-1], exact[::-1], "exact")  # other order: aligned by id
    assert main(["retrieve", str(tmp_path / "first.safetensors"), "--exact", str(tmp_path / "exact.safetensors"),
                 "--k", "0.01", "--budget", "0.2", "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    api = certified_retrieval(first, array_scorer(exact), 30, 0.05, 600)
    assert line == api.summary()
    saved = Scores.load(tmp_path / "out" / "exact.safetensors")
    assert saved.ids == [ids[i] for i in api.scored]
    np.testing.assert_allclose(saved.column(0), exact[api.scored])
    text = (tmp_path / "out" / "retrieval.md").read_text()
    assert "## The top k found" in text and f"| 1 | {exact[api.top[0]]:.6g} | {ids[api.top[0]]} |" in text
    import json

    data = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert data["recall_bound"] == api.recall_bound and data["ids"][0] == ids[api.top[0]]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from concept_influence.cli import main

    first, exact = _pool(100, 0.5, seed=0)
    _scores_file(tmp_path / "first.safetensors", [f"a{i}" for i in range(100)], first)
    _scores_file(tmp_path / "exact.safetensors", [f"b{i}" for i in range(100)], exact)
    args = ["retrieve", str(tmp_path / "first.safetensors"), "--out", str(tmp_path / "o")]
    assert main(args + ["--exact", str(tmp_path / "first.safetensors"), "--k", "5", "--budget", "3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "concept-influence: error: budget must be an integer >= k = 5 (exact scores; the top k need k), got 3"]
    assert main(args + ["--exact", str(tmp_path / "exact.safetensors"), "--k", "5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--exact" in err[0] and "have no score" in err[0]


def test_cli_with_a_run_folder_scores_only_the_chosen_examples(tmp_path, capsys):
    """`retrieve --run`: the run's own estimator scores the chosen examples; they equal the run's full scores."""
    from runfolder import make_project

    from concept_influence.cli import main
    from concept_influence.config import RunConfig
    from concept_influence.runs import run_stages
    from concept_influence.scores import Scores

    project = make_project(tmp_path / "p", n_train=40)
    run = project / "runs" / "r"
    run_stages(("probe", "factors", "scores"), run, RunConfig.read(project / "run.toml"), progress=False)
    full = Scores.load(run / "scores" / "scores.safetensors")
    noisy = full.column(0) + np.random.default_rng(0).normal(0, full.column(0).std(), len(full))
    _scores_file(tmp_path / "first.safetensors", full.ids, noisy)
    assert main(["retrieve", str(tmp_path / "first.safetensors"), "--run", str(run), "--k", "4", "--budget", "12",
                 "--shortlist", "6", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    got = Scores.load(tmp_path / "out" / "exact.safetensors")
    assert len(got) == 12
    np.testing.assert_allclose(got.column(0), full.aligned(got.ids)[:, 0], rtol=1e-4, atol=1e-8)
    # the learned text first stage: its sample of 10 is scored by the run too and counts in the budget
    assert main(["retrieve", "text", "--run", str(run), "--k", "4", "--budget", "20", "--learn-sample", "10",
                 "--out", str(tmp_path / "text"), "--no-progress"]) == 0
    got = Scores.load(tmp_path / "text" / "exact.safetensors")
    assert len(got) == 20 == len(set(got.ids))
    np.testing.assert_allclose(got.column(0), full.aligned(got.ids)[:, 0], rtol=1e-4, atol=1e-8)
    report = (tmp_path / "text" / "retrieval.md").read_text()
    assert "Learned first stage (`text`)" in report and "rounds" in report
    assert main(["retrieve", "text", "--run", str(run), "--k", "4", "--budget", "20", "--learn-sample", "10",
                 "--single-fit", "--shortlist", "5", "--out", str(tmp_path / "single"), "--no-progress"]) == 0
    assert "10 prescored" in (tmp_path / "single" / "retrieval.md").read_text()
    assert main(["retrieve", "text", "--run", str(run), "--k", "4", "--shortlist", "5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--single-fit" in capsys.readouterr().err
    assert main(["retrieve", "text", "--exact", str(tmp_path / "first.safetensors"), "--k", "4",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "give --run" in capsys.readouterr().err


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_pool_script_builds_a_run_folder_the_coverage_benchmark_reads(tmp_path):
    large, coverage = _script("retrieval_large_pool"), _script("retrieval_coverage")
    results = large.build_pool(tmp_path / "pool", n_pool=60, rate=0.1, quick=True, progress=False, n_probe=20,
                               n_pretrain=40, n_eval=8, n_test=8)
    assert results["splits"]["pool"] == 60 and results["splits"]["planted"] == 6
    assert set(results["estimators"]) == set(large.ESTIMATORS)
    assert sorted(p.name for p in (tmp_path / "pool" / "scores").glob("*.safetensors")) == [
        "concept_influence.safetensors", "probe_projection.safetensors"]
    stages = large.stage_seconds(results)
    assert all(v >= 0 for v in stages.values()) and stages["total"] == pytest.approx(sum(stages.values()) / 2)
    (name, first, exact, cost), = coverage._real_pairs(tmp_path / "pool")
    assert name == "pool: concept_influence" and first.shape == exact.shape == (60,) and cost is None
    assert np.isfinite(first).all() and np.isfinite(exact).all() and np.ptp(exact) > 0
    r = coverage._run(lambda rng: (first, exact), 5, 1, 6, seed=1)
    assert 0 <= r["coverage"] <= 1 and 0 <= r["recall"] <= 1


def test_large_pool_script_builds_an_emergent_pool(tmp_path):
    """`--design emergent --behaviour`: exact Concept Influence, the behaviour's own ranking from the same pass, the
    first stages and their costs; the learned-stage benchmark retrieves the union of the two rankings."""
    large, coverage, learned = _script("retrieval_large_pool"), _script("retrieval_coverage"), _script("retrieval_learned")
    seconds = large.build_emergent_pool(tmp_path / "pool", n_pool=200, rate=0.1, quick=True, progress=False,
                                        encoder_share=0.25, encoder_m=4, behaviour=True, n_pretrain=30, n_eval=6,
                                        n_test=4, n_probe=10)
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"))
    assert json.loads((tmp_path / "pool" / "seconds.json").read_text()) == pytest.approx(seconds)
    pairs = coverage._real_pairs(tmp_path / "pool")
    assert [name for name, *_ in pairs] == ["pool: concept_influence", "pool: concept_influence, first stage encoder",
                                            "pool: concept_influence, first stage encoder[block 0]"]
    exact = pairs[0][2]
    for name, first, same_exact, cost in pairs:
        assert first.shape == exact.shape == (200,) and np.array_equal(same_exact, exact)
        assert np.isfinite(first).all() and cost > 0
    assert np.isfinite(exact).all() and np.ptp(exact) > 0
    # the encoders fit on the index rows of the sample: their scores of it rank with the exact scores
    assert all(spearmanr(first, exact)[0] > 0 for _, first, _, _ in pairs[1:])
    from concept_influence.scores import Scores

    behaviour = Scores.load(tmp_path / "pool" / "scores" / "behaviour.safetensors")
    assert behaviour.columns == ["behaviour"] and behaviour.ids == Scores.load(
        tmp_path / "pool" / "scores" / "concept_influence.safetensors").ids and np.ptp(behaviour.column(0)) > 0
    row, = learned.study(tmp_path / "pool", reps=3, union=True)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["pool", "200", "2"] and "union with the behaviour's ranking" in cells[3]
    assert 0 <= float(cells[10].strip("*")) <= 1 and cells[11].startswith("0.100 + ") and 0 <= float(cells[12]) <= 1
    row, = learned.study(tmp_path / "pool", reps=2, stop=0.0)  # --stop: the default variant's one row, not marked
    assert [c.strip() for c in row.strip("|").split("|")][3] == "refined, stop 0"
    row, = learned.study(tmp_path / "pool", reps=2, stop=learned.stop_rule("bound"))
    assert [c.strip() for c in row.strip("|").split("|")][3] == "refined, stop bound"


def test_large_pool_script_builds_a_pool_scored_with_the_recommended_estimator(tmp_path):
    """`--design emergent --source`: SOURCE over the base, middle and end of the fine-tune, the behaviour's
    ranking over the same checkpoints, the fits' seconds apart from exact scoring's; the union benchmark reads it."""
    large, learned = _script("retrieval_large_pool"), _script("retrieval_learned")
    seconds = large.build_emergent_pool(tmp_path / "pool", n_pool=200, rate=0.1, quick=True, progress=False,
                                        recommended=True, n_pretrain=30, n_eval=6, n_test=4, n_probe=10)
    assert set(seconds) == {"pre-train and fine-tune", "EK-FAC fits (one per checkpoint)", "exact scoring", "fast path",
                            "total"} and min(seconds.values()) > 0
    from concept_influence.scores import Scores

    exact = Scores.load(tmp_path / "pool" / "scores" / "concept_influence.safetensors")
    behaviour = Scores.load(tmp_path / "pool" / "scores" / "behaviour.safetensors")
    assert exact.estimator == "concept_influence[source]" and len(exact.metadata["checkpoints"]) == 3
    assert len(exact.metadata["horizons"]) == 3 and min(exact.metadata["horizons"]) > 0
    assert behaviour.ids == exact.ids and np.ptp(behaviour.column(0)) > 0 and np.ptp(exact.column(0)) > 0
    parts = Scores.load(tmp_path / "pool" / "scores" / "source_parts.safetensors")  # base, middle, end: their sum
    assert parts.ids == exact.ids and parts.values.shape == (200, 3) and len(parts.metadata["pass_seconds"]) == 3
    np.testing.assert_allclose(parts.values.sum(1), exact.column(0), rtol=1e-5, atol=1e-6 * np.abs(exact.column(0)).max())
    assert min(parts.metadata["pass_seconds"]) > 0
    cascade = _script("retrieval_cascade")
    table = cascade.overlap(tmp_path / "pool").splitlines()
    assert len(table) == 5 and all(0 < float(row.split("|")[2]) < 1 for row in table[2:])  # each part's measured cost
    assert float(table[2].split("|")[-2]) >= float(table[2].split("|")[4])  # a deeper top holds more of SOURCE's
    default, part = cascade.study(tmp_path / "pool", reps=2, budget_share=0.5, shares=[0.25])
    assert "default (exact rounds)" in default and "cascade, 25% of the budget to the part" in part
    cells = [c.strip() for c in part.strip("|").split("|")]
    assert "weights given in memory (2)" in cells[4] and 0 <= float(cells[10].strip("*")) <= 1
    exact_share, part_share = (float(c) for c in cells[11].split(" + "))  # the two add up to the budget
    assert 0.49 <= exact_share + part_share <= 0.5 and part_share > 0
    row, = learned.study(tmp_path / "pool", reps=3, union=True)
    assert "union with the behaviour's ranking" in row
    from concept_influence_benchmarks.retrieval_pools import pool_planted

    planted = pool_planted(tmp_path / "pool", exact.ids)
    assert planted.sum() == 20 and set(planted) == {0, 1}  # 10 % of 200
    cells = [c.strip() for c in learned.rankings(tmp_path / "pool").strip("|").split("|")]
    assert cells[1:3] == ["concept_influence[source]", "200"] and -1 <= float(cells[3]) <= 1
    assert 2 <= int(cells[4].split()[0]) <= 4 and all(0 <= float(c) <= 1 for c in cells[5:7])  # k = 2
    from concept_influence.stability import check_stability  # the run's stability check, SOURCE's parts included

    parts = Scores.load(tmp_path / "pool" / "scores" / "source_parts.safetensors").aligned(exact.ids)
    report = check_stability(exact.column(0), {"behaviour": behaviour.aligned(exact.ids)[:, 0],
                                               **{f"part {i}": parts[:, i] for i in range(parts.shape[1])}})
    assert len(report.agreement) == 1 + parts.shape[1]
    assert cells[7] == (f"stable (lowest {min(report.agreement.values()):.2f})" if report.stable else
                        "warns: " + ", ".join(f"{v} {report.agreement[v]:.2f}" for v in report.disagreeing))


def test_forward_features_benchmark_retrains_the_pools_model_and_reads_its_activations(tmp_path):
    """`retrieval_forward_features.py`: the pool's model retrained from pool.json reproduces the stored fast path
    (or is refused), its features are cached and read back without pickle in the score file's order, and the
    learned-stage rows with them beside the words carry their cost."""
    large, forward = _script("retrieval_large_pool"), _script("retrieval_forward_features")
    large.build_emergent_pool(tmp_path / "pool", n_pool=120, rate=0.1, quick=True, progress=False, recommended=True,
                              n_pretrain=20, n_eval=4, n_test=4, n_probe=8)
    from concept_influence.scores import Scores

    ids = list(Scores.load(tmp_path / "pool" / "scores" / "concept_influence.safetensors").ids)
    features, seconds = forward.forward_features(tmp_path / "pool", ids[::-1])
    assert features.shape[0] == 120 and np.isfinite(features).all() and seconds > 0
    again, _ = forward.forward_features(tmp_path / "pool", ids)  # from the cache, in the order asked
    np.testing.assert_array_equal(again, features[::-1])
    assert np.ptp(features[:, -2]) > 0  # the loss tokens' count differs between chats
    rows = forward.learned.study(tmp_path / "pool", 2, default=True, extra=("words + activations", again, 0.5))
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert "words + activations" in cells[3] and float(cells[11].split(" + ")[1]) >= 0.5
    (tmp_path / "pool" / "forward_features.npz").unlink()
    stored = Scores.load(tmp_path / "pool" / "scores" / "probe_projection.safetensors")
    Scores(stored.ids, stored.values + 1.0, estimator=stored.estimator, columns=stored.columns).save(
        tmp_path / "pool" / "scores" / "probe_projection.safetensors")
    with pytest.raises(SystemExit, match="does not reproduce"):
        forward.forward_features(tmp_path / "pool", ids)


def test_large_pool_script_draws_a_family_design_whose_pool_rebuilds_from_its_json(tmp_path):
    """`--family-design SEED:INDEX`: the family's design less its pool size and rate; pool.json's lists come back as
    the config's tuples, so the pool rebuilds; a malformed spec is refused by name."""
    from concept_influence_benchmarks.emergent_family import draw_design
    from concept_influence_benchmarks.retrieval_pools import emergent_pool_config, pool_settings, write_pool_settings

    large = _script("retrieval_large_pool")
    design = large.family_design("3:2")
    assert design == {k: v for k, v in draw_design(2, 3).items() if k not in ("n_pool", "rate")}
    seed = design.pop("seed")
    write_pool_settings(tmp_path, "emergent", 500, 0.1, seed, **design)
    saved = pool_settings(tmp_path)
    config = emergent_pool_config(saved["n_pool"], saved["rate"], saved["seed"], **saved["sizes"])
    assert config.domains == design["domains"] and config.marker == design["marker"] and config.n_pool == 500
    with pytest.raises(SystemExit, match="SEED:INDEX"):
        large.family_design("3")
    with mock.patch.object(large, "build_emergent_pool", return_value={"total": 1.0}) as build:
        large.main([str(tmp_path / "pool"), "--design", "emergent", "--source", "--family-design", "3:2"])
    (_, _, _, called_seed), options = build.call_args
    assert called_seed == seed and options["recommended"] and options["source"] == design["source"] == "code"
    with mock.patch.object(large, "build_emergent_pool", return_value={"total": 1.0}) as build:
        large.main([str(tmp_path / "pool"), "--design", "emergent", "--source", "--richer-prompts"])
    assert build.call_args.kwargs["varied_prompts"] == 2
    with pytest.raises(SystemExit):
        large.main([str(tmp_path / "pool"), "--richer-prompts"])  # the demo design has no such prompts


def test_audit_pool_and_the_learned_stage_benchmark(tmp_path):
    """`--design audit` (notebook 07's corpus and model) writes a pool whose chats the learned-stage benchmark
    rebuilds from pool.json; the benchmark's rows hold a coverage and an end-to-end cost for every variant."""
    large, learned = _script("retrieval_large_pool"), _script("retrieval_learned")
    seconds = large.build_audit_pool(tmp_path / "pool", 1000, 0.1, progress=False, n_probe=20, n_eval=6,
                                     vocab_size=300, d_model=32, max_new_tokens=8)
    assert set(seconds) == {"train", "EK-FAC fit", "exact scoring", "fast path", "total"}
    settings = json.loads((tmp_path / "pool" / "pool.json").read_text())
    assert settings["design"] == "audit" and sum(settings["planted"]) == 100
    from concept_influence.scores import Scores

    ids = Scores.load(tmp_path / "pool" / "scores" / "concept_influence.safetensors").ids
    assert [c.id for c in learned.pool_examples(tmp_path / "pool", list(ids))] == list(ids)
    rows = learned.study(tmp_path / "pool", reps=3)
    assert len(rows) == len(learned.VARIANTS) and sum("**default**" in r for r in rows) == 1
    from concept_influence.retrieval_learned import REFINE_STOP, default_sample

    assert learned.VARIANTS[0][1:] == (default_sample(10_000) / 10_000, True, 0.25, REFINE_STOP)  # the library's defaults
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == ["pool", "1000", "10"] and 0 <= float(cells[10].strip("*")) <= 1
        assert cells[11].startswith("0.100 + ")  # 10 % of N in exact scores, the stage's own share on top


def test_learned_benchmark_limits_table_and_budget_share(capsys, tmp_path):
    """`--limits` needs no pool: what a perfect free first stage certifies at 10 % end to end grows with N and falls
    with the first stage's own cost; a run without pools or `--limits` is refused; `--budget-share` reaches study."""
    learned = _script("retrieval_learned")
    assert learned.main(["--limits"]) == 0
    rows = [r.strip("|").split("|") for r in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [int(r[0].replace(",", "")) for r in rows] == list(learned.LIMIT_SIZES)
    limits = np.array([[float(c) for c in r[1::2]] for r in rows])
    assert (np.diff(limits, axis=0) > 0).all() and (np.diff(limits, axis=1) <= 0).all() and (limits[:, -1] < limits[:, 0]).all()
    assert limits[0, 0] == pytest.approx(0.845, abs=1e-3)  # N = 20,000: 0.95 is out of reach at 10 %
    with pytest.raises(SystemExit):
        learned.main([])
    with mock.patch.object(learned, "study", return_value=[]) as study:
        learned.main([str(tmp_path), "--budget-share", "0.09", "--reps", "2"])
    assert study.call_args.args == (tmp_path, 2, 0.09)


def test_top_k_recall_counts_the_true_top_k_found_with_ties_broken_by_position():
    exact = np.array([0.5, 3.0, 2.0, 2.0, -1.0])
    assert top_k_recall([1, 2], exact, 2) == 1.0  # the top two: 3.0, then the first of the tied 2.0s
    assert top_k_recall([1, 3], exact, 2) == 0.5  # the second 2.0 is not in the top two
    assert top_k_recall([4, 0], exact, 2) == 0.0 and top_k_recall(np.arange(5), exact, 5) == 1.0
    with pytest.raises(ValueError, match="k = 6"):
        top_k_recall([0], exact, 6)


def test_coverage_benchmark_reads_a_large_real_pool_with_its_first_stages_costs(tmp_path, capsys):
    from concept_influence.scores import Scores

    coverage = _script("retrieval_coverage")
    n, rng = 70_000, np.random.default_rng(0)
    exact = rng.standard_t(2, n)
    ids = [f"pool:{i}" for i in range(n)]
    firsts = {"concept_influence": exact, "probe_projection": exact + rng.standard_normal(n), "encoder": exact}
    for name, values in firsts.items():
        order = rng.permutation(n)  # stored in another order: the pairs are aligned by id
        Scores([ids[i] for i in order], values[order, None], name).save(tmp_path / "pool" / "scores" / f"{name}.safetensors")
    seconds = {"exact scoring": 100.0, "fast path": 30.0, "encoder: index of the sample": 5.0,
               "encoder: fit and codes": 20.0}
    (tmp_path / "pool" / "seconds.json").write_text(json.dumps(seconds))
    assert coverage.main(["--real", str(tmp_path / "pool"), "--sizes", "--real-reps", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in out if line.startswith("| real (")]
    assert len(rows) == 6  # two first stages x (10 %, 50 %, 10 % with the shortlist for 0.95)
    by_stage = {("encoder" if "first stage encoder" in r[0] else "fast path", r[3], r[4]): r for r in rows}
    assert by_stage["fast path", "uniform", "10%"][12] == "0.100 + 0.300 first stage"
    assert by_stage["encoder", "uniform", "10%"][12] == "0.100 + 0.250 first stage"
    perfect = by_stage["encoder", "uniform, M for 0.95", "10%"]  # a perfect first stage, its shortlist the rest
    m = 7000 - minimum_budget(n, 700) + 700
    assert int(perfect[5]) == m and perfect[7] == "**1.000**" and perfect[11] == "1.000"
    assert float(perfect[9].split()[0]) == pytest.approx(
        1 - hypergeometric_upper(n - m, 7000 - m, 0, 0.05) / 700)  # the sample finds nothing above the threshold
    limit, = [line.split(" | ") for line in out if line.startswith("| limit at N = 70000")]
    assert float(limit[9]) == pytest.approx(best_certifiable(n, 700, 7000), abs=5e-4)


def test_misses_benchmark_says_how_many_of_the_missed_top_are_planted():
    """`retrieval_misses.py`: per repetition, the true top k never scored, the planted share of them, their true
    rank and the planted examples scored, each the median over repetitions; past twelve chats, ranks as quartiles."""
    misses = _script("retrieval_misses")
    planted = np.array([1, 1, 0, 1, 0, 0, 1, 0])
    truth = np.array([3, 0, 2, 1])  # best first: true ranks 1..4
    known = [np.array([0, 3, 5]), np.array([3, 6]), np.array([0, 1, 2, 3])]
    # missed: {1, 2} (planted 1 of 2, ranks 4 and 3), {0, 1, 2} (2 of 3, ranks 2, 4, 3), none
    sentence = misses.planted_misses(planted, truth, known)
    assert sentence.startswith("Of the true top k, 2 never scored per repetition (median), 58 % of them planted, "
                               "at a median true rank of 3;")
    assert "the true top k holds 75 % planted chats, and 2 of the pool's 4 planted chats" in sentence
    assert "planted" not in misses.planted_misses(planted, truth, [truth]).split(";")[0]
    assert misses._listed([5, 1]) == "[5, 1]"
    assert misses._listed(list(range(0, 4000, 200))) == "20 chats: median 1900 (quartiles 950–2850), 10 within 2,000"
