"""Low-rank queries (``ScoringSettings.query_rank``): exact against SVD-truncated queries dotted with per-example
autograd gradients, equal to full rank at full rank, column- and batch-size invariant; the contractions the
engine chooses between; the setting's checks and its record in a run folder."""

import numpy as np
import pytest
import torch
from test_engine import explicit_scores, random_queries

from concept_influence.concepts import ConceptFunction
from concept_influence.config import RunConfig
from concept_influence.curvature import fit_curvature
from concept_influence.engine import (
    LowRankQuery,
    ScoringSettings,
    example_query_scores,
    low_rank_queries,
    score_with_queries,
    token_query_scores,
)
from concept_influence.estimators import ConceptInfluence
from concept_influence.runs import Run, RunError
from probes import ConceptDirection

HOOK = "blocks.1.hook_resid_post"
FULL = 32  # min(d_out, d_in) of every map of the tiny TransformerLens model (d_model 32)


@pytest.fixture(scope="module")
def setup(tokenizer, tokenized):
    """The tiny model, three concept directions at block 1, and an EK-FAC curvature of its tracked maps."""
    from concept_influence.toy.small_model import build_small_model

    adapter = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)
    g = torch.Generator().manual_seed(0)
    dirs = [ConceptDirection(torch.randn(32, generator=g), HOOK, kind="custom", metadata={"name": n}) for n in "abc"]
    maps = adapter.linear_maps(max_block=1)
    curvature = fit_curvature(adapter, tokenized, maps=maps, strategy="ekfac", batch_size=6, progress=False)
    return adapter, dirs, curvature


def concept_scores(setup, tokenized, dirs, batch_size=5, **scoring):
    adapter, _, curvature = setup
    concept = ConceptFunction.from_directions(dirs, eval_examples=tokenized[:3])
    est = ConceptInfluence(concept, curvature, **scoring)
    return est, est.score(adapter, tokenized, batch_size=batch_size, progress=False)


def truncated(q: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of each matrix of ``q`` ``[K, d_out, d_in]``, in float64."""
    U, S, Vh = torch.linalg.svd(q.double(), full_matrices=False)
    return (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]


def close(got, ref, rtol=1e-5):
    return np.abs(got - ref).max() <= rtol * np.abs(ref).max()


@pytest.mark.parametrize("rank", [FULL, 1000])
def test_full_rank_equals_full_rank_scores(setup, tokenized, rank):
    _, full = concept_scores(setup, tokenized, setup[1])
    est, got = concept_scores(setup, tokenized, setup[1], query_rank=rank)
    assert all(isinstance(q, torch.Tensor) for q in est._queries[1].values())  # r >= min(d_out, d_in): dense
    assert close(got.values, full.values) and got.metadata["query_rank"] == rank


def test_factors_at_full_rank_equal_the_dense_query(setup, tokenized):
    """The factored contractions themselves, with every singular vector kept, give the full-rank scores."""
    adapter = setup[0]
    maps = adapter.linear_maps(max_block=1)
    queries = random_queries(maps, k=3)
    factored = {}
    for name, q in queries.items():
        U, S, Vh = torch.linalg.svd(q, full_matrices=False)
        factored[name] = LowRankQuery(U * S[..., None, :], Vh)
    kw = dict(estimator="t", columns=list("abc"), batch_size=5, progress=False)
    dense = score_with_queries(adapter, tokenized, maps, queries, **kw)
    for per_token in (False, True):
        got = score_with_queries(adapter, tokenized, maps, factored, per_token=per_token, **kw)
        assert close(got.values, dense.values)


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_equals_truncated_queries_dotted_with_autograd_gradients(setup, tokenized, rank):
    adapter, dirs, _ = setup
    est, full = concept_scores(setup, tokenized, dirs)
    dense = est._queries[1]
    _, got = concept_scores(setup, tokenized, dirs, query_rank=rank)
    maps = adapter.linear_maps(max_block=1)
    ref = -explicit_scores(adapter, tokenized, maps, {n: truncated(q, rank) for n, q in dense.items()})
    assert close(got.values, ref)
    assert not close(got.values, full.values, 1e-2)  # the truncation changes the scores: the test can fail


def test_k_columns_in_one_pass_equal_one_at_a_time(setup, tokenized):
    dirs = setup[1]
    _, three = concept_scores(setup, tokenized, dirs, query_rank=2)
    for k, d in enumerate(dirs):
        _, one = concept_scores(setup, tokenized, [d], query_rank=2)
        assert close(three.column(k), one.column(0))


def test_batch_size_invariant_and_per_token_shares_sum(setup, tokenized):
    dirs = setup[1]
    _, one = concept_scores(setup, tokenized, dirs, batch_size=1, query_rank=2)
    _, all_ = concept_scores(setup, tokenized, dirs, batch_size=len(tokenized), query_rank=2, per_token=True)
    assert close(all_.values, one.values)
    for n, i in enumerate(all_.ids):
        np.testing.assert_allclose(all_.per_token[i].sum(0), all_.values[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k, rank, d_out, d_in, path", [
    (1, 2, 12, 40, "token"),     # small K·r: per token, on the factors
    (6, 5, 12, 40, "example"),   # large K·r: through the per-example gradient of the rank-r query
    (1, None, 12, 40, "token"),  # dense, one query: per token
    (6, None, 12, 40, "example"),
])
def test_both_contractions_equal_the_explicit_sum(k, rank, d_out, d_in, path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    a, grad = torch.randn(3, 7, d_in, generator=g), torch.randn(3, 7, d_out, generator=g)
    query = low_rank_queries({"m": torch.randn(k, d_out, d_in, generator=g)}, rank)["m"]
    dense = query.dense if rank else query
    assert isinstance(query, LowRankQuery) == (rank is not None)
    ref = torch.einsum("bto,koi,bti->btk", grad, dense, a)
    torch.testing.assert_close(token_query_scores(a, grad, query), ref, rtol=1e-5, atol=1e-5)
    calls = []
    monkeypatch.setattr("concept_influence.engine.token_query_scores", lambda *x: calls.append(1) or ref)
    got = example_query_scores(a, grad, query)
    assert (calls == [1]) == (path == "token")
    torch.testing.assert_close(got, ref.sum(1), rtol=1e-5, atol=1e-5)


def test_factors_of_too_high_a_rank_are_refused():
    q = LowRankQuery(torch.ones(1, 4, 3), torch.ones(1, 3, 5))
    assert low_rank_queries({"m": q}, 3)["m"] is q
    with pytest.raises(ValueError, match="query of map 'm' has rank 3 > query_rank 2"):
        low_rank_queries({"m": q}, 2)


def test_query_rank_is_checked_and_a_changed_rank_is_refused_on_resume(tmp_path):
    with pytest.raises(ValueError, match="query_rank must be >= 1, got 0"):
        ScoringSettings(query_rank=0)
    minimal = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "probe": {"hook": "h", "direction": "d"}}
    cfg = RunConfig.from_dict({**minimal, "scoring": {"query_rank": 4}}, "test.toml")
    assert cfg.scoring.settings() == ScoringSettings(query_rank=4)
    run = Run.open(tmp_path / "run", cfg)
    run.save_settings("scores", cfg.scoring.to_dict())
    run.check_settings("scores", cfg.scoring.to_dict())
    for new, message in ((8, "query_rank: 4 -> 8"), (None, "query_rank: 4 -> None")):
        with pytest.raises(RunError, match=message):
            run.check_settings("scores", cfg.scoring.replace(query_rank=new).to_dict())
