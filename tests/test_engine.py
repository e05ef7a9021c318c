"""The streaming engine against explicit per-example autograd gradients, and Scores I/O."""

import numpy as np
import pytest
import torch

from concept_influence.data import collate
from concept_influence.engine import ScoringError, gradient_norms, score_with_queries, token_query_scores
from concept_influence.scores import Scores


def explicit_scores(adapter, examples, maps, queries):
    """⟨Q_k, ∇L(z)⟩ from torch.autograd.grad on each example alone."""
    rows = []
    for ex in examples:
        loss = adapter.per_example_loss(collate([ex], adapter.pad_token_id)).sum()
        grads = torch.autograd.grad(loss, [m.weight for m in maps], allow_unused=True)
        row = 0
        for m, g in zip(maps, grads):
            if g is not None:
                row = row + torch.einsum("koi,oi->k", queries[m.name].double(), m.to_matrix(g).double())
        rows.append(row)
    return torch.stack(rows).numpy()


def random_queries(maps, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(k, *m.shape, generator=g) for m in maps}


def test_engine_equals_per_example_autograd(any_adapter, tokenized):
    maps = any_adapter.linear_maps()
    queries = random_queries(maps)
    scores = score_with_queries(any_adapter, tokenized, maps, queries, estimator="t", columns=["a", "b", "c"],
                                batch_size=5, progress=False)
    ref = explicit_scores(any_adapter, tokenized, maps, queries)
    assert np.abs(scores.values - ref).max() <= 1e-4 * np.abs(ref).max()


def explicit_norms(adapter, examples, maps):
    rows = []
    for ex in examples:
        loss = adapter.per_example_loss(collate([ex], adapter.pad_token_id)).sum()
        grads = torch.autograd.grad(loss, [m.weight for m in maps], allow_unused=True)
        rows.append(sum(float(g.double().pow(2).sum()) for g in grads if g is not None) ** 0.5)
    return np.array(rows)


def test_unit_normalisation_equals_autograd_gradient_norms(any_adapter, tokenized):
    maps = any_adapter.linear_maps(max_block=0)
    queries = random_queries(maps, k=2)
    norms = explicit_norms(any_adapter, tokenized, maps)
    got = gradient_norms(any_adapter, tokenized, maps, batch_size=4, progress=False)
    np.testing.assert_allclose(got, norms, rtol=1e-4)
    kw = dict(estimator="t", columns=["a", "b"], batch_size=5, progress=False, per_module=True, per_token=True)
    unit = score_with_queries(any_adapter, tokenized, maps, queries, normalize="unit", **kw)
    ref = explicit_scores(any_adapter, tokenized, maps, queries) / norms[:, None]
    assert np.abs(unit.values - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(sum(unit.per_module.values()), unit.values, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(unit.per_token[unit.ids[0]].sum(0), unit.values[0], rtol=1e-5, atol=1e-7)


def test_engine_is_batch_size_invariant_and_breakdowns_sum(tl_adapter, tokenized):
    maps = tl_adapter.linear_maps(max_block=0)
    queries = random_queries(maps, k=2)
    kw = dict(estimator="t", columns=["a", "b"], progress=False, per_module=True, per_token=True)
    one = score_with_queries(tl_adapter, tokenized, maps, queries, batch_size=1, **kw)
    all_ = score_with_queries(tl_adapter, tokenized, maps, queries, batch_size=len(tokenized), **kw)
    np.testing.assert_allclose(one.values, all_.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sum(all_.per_module.values()), all_.values, rtol=1e-5, atol=1e-6)
    for n, i in enumerate(all_.ids):
        assert all_.per_token[i].shape == (len(tokenized[n].input_ids), 2)
        np.testing.assert_allclose(all_.per_token[i].sum(0), all_.values[n], rtol=1e-5, atol=1e-6)


def test_token_query_scores_both_contraction_orders():
    g = torch.Generator().manual_seed(0)
    a, gr = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 3, generator=g)
    for q in (torch.randn(4, 3, 7, generator=g), torch.randn(4, 9, 7, generator=g)):
        gg = gr if q.shape[1] == 3 else torch.randn(2, 5, 9, generator=g)
        ref = torch.einsum("bto,koi,bti->btk", gg, q, a)
        torch.testing.assert_close(token_query_scores(a, gg, q), ref, rtol=1e-5, atol=1e-5)


def test_nonfinite_loss_names_the_example(tl_adapter, tokenized):
    maps = tl_adapter.linear_maps(max_block=0)
    with torch.no_grad():
        tl_adapter.model.unembed.W_U[:, tokenized[3].input_ids[-1]] = float("nan")
    with pytest.raises(ScoringError, match=tokenized[3].id):
        score_with_queries(tl_adapter, tokenized, maps, random_queries(maps, 1), estimator="t", columns=["a"],
                           batch_size=4, progress=False)


def test_scores_ranking_and_round_trip(tmp_path):
    s = Scores(["a", "b", "c"], np.array([[0.5, 1], [2.0, 0], [-1.0, 3]]), "est", ["x", "y"], {"note": 1},
               per_module={"m": np.ones((3, 2))}, per_token={"a": np.ones((2, 2)), "b": np.zeros((1, 2)), "c": np.ones((4, 2))})
    assert [i for i, _ in s.ranked("x")] == ["b", "a", "c"]
    assert s.top(1, "y")[0][0] == "c" and s.bottom(1, "x")[0][0] == "c"
    assert "b" in s.format_top(2, texts={"a": "text a", "b": "text b"})
    loaded = Scores.load(s.save(tmp_path / "s.safetensors"))
    np.testing.assert_array_equal(loaded.values, s.values)
    assert loaded.ids == s.ids and loaded.columns == s.columns and loaded.metadata == {"note": 1}
    np.testing.assert_array_equal(loaded.per_token["c"], s.per_token["c"])
    np.testing.assert_array_equal(loaded.per_module["m"], s.per_module["m"])
    np.testing.assert_array_equal(loaded.aligned(["c", "a"])[:, 0], [-1.0, 0.5])


def test_scores_refuse_pickle(tmp_path):
    path = tmp_path / "s.safetensors"
    torch.save({"values": torch.zeros(2)}, path)
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        Scores.load(path)


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os

    path = Scores(["a"], np.array([1.0]), "est").save(tmp_path / "s.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
